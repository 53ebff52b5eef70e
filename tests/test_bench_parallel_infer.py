"""The inference-on-cores benchmark runs both ways (ours and the reference scheduling) on a tiny set,
so its baseline keeps working between measurements; the two ways must write the same labels."""
import re

from bench import bench_parallel_infer


def test_both_ways_run_and_agree(capsys):
    bench_parallel_infer.main(["--num_images", "2", "--repeats", "1", "--image_size", "64",
                               "--width_mult", "0.0625"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "**" in line]
    assert [row.split("|")[1].strip() for row in rows] == list(bench_parallel_infer.STAGES)
    for row in rows:
        assert float(re.search(r"\*\*([0-9.]+)\*\*", row).group(1)) > 0
        assert re.search(r"PNG pixels differing 0/\d+", row), row
