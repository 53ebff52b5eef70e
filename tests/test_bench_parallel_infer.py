"""The inference-on-cores benchmark runs every way (the reference scheduling, ours at the default
precision, ours in float32) on a tiny set, so its baseline keeps working between measurements; in
float32 ours must write the reference's labels exactly, at the default precision (bf16 on a CPU
with native bf16) nearly all of them."""
import re

from bench import bench_parallel_infer


def test_every_way_runs_and_agrees(capsys):
    bench_parallel_infer.main(["--num_images", "2", "--repeats", "1", "--image_size", "64",
                               "--width_mult", "0.0625", "--fp32"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "**" in line]
    ways = [tuple(cell.strip() for cell in row.split("|")[1:3]) for row in rows]
    assert ways == [(stage, way) for stage in bench_parallel_infer.STAGES for way in ("ours", "ours_fp32")]
    for row, (_, way) in zip(rows, ways):
        assert float(re.search(r"\*\*([0-9.]+)\*\*", row).group(1)) > 0
        differing, pixels = map(int, re.search(r"PNG pixels differing (\d+)/(\d+)", row).groups())
        assert pixels > 0
        if way == "ours_fp32":
            assert differing == 0, row
        else:
            assert differing <= 0.02 * pixels, row
