"""AVC classifier throughput: seed inference (batched views vs one forward per view) and training.

    python -m bench.bench_avc                          # CPU, small width (what this machine can run)
    python -m bench.bench_avc --width_mult 1.0 --image_size 448 --device cuda --num_images 50

Inference runs SEAM's 4 scales x 2 flips per image through ``tool.multiscale``: batched (one
forward per scale, both flips together) against the straightforward one forward per view. The
two must give the same CAMs (checked). Training runs ``avc_training_losses`` + backward + SGD
step on random batches. Prints images/s; it measures, it asserts no time.
"""
from __future__ import annotations

import argparse
import time

import torch

from bench.unbatched_views import forward_views_unbatched
from network.avc import AVCNet, avc_training_losses
from tool.device import autocast_context
from tool.multiscale import forward_views


def views_for(image: torch.Tensor, scales: tuple[float, ...]) -> list[torch.Tensor]:
    height, width = image.shape[-2:]
    views = []
    for scale in scales:
        scaled = torch.nn.functional.interpolate(image[None], size=(round(height * scale), round(width * scale)),
                                                 mode="bilinear", align_corners=False)[0]
        views.append(torch.stack([scaled, scaled.flip(-1)]))
    return views


def time_inference(model: AVCNet, images: list[torch.Tensor], scales: tuple[float, ...], device: torch.device,
                   batched: bool) -> tuple[float, list[torch.Tensor]]:
    run = forward_views if batched else forward_views_unbatched

    def class_cams(batch: torch.Tensor) -> torch.Tensor:
        return model.forward_cam(batch)[:, 1:]

    outputs = []
    run(class_cams, views_for(images[0], scales), images[0].shape[-2:], device=device)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for image in images:
        outputs.append(run(class_cams, views_for(image, scales), image.shape[-2:], device=device).float().cpu())
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - start), outputs


def time_training(model: AVCNet, args: argparse.Namespace, device: torch.device) -> float:
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    labels = (torch.rand(args.batch_size, model.num_classes, device=device) > 0.5).float()
    amp = autocast_context(device)
    elapsed = 0.0
    for step in range(args.train_steps + 1):
        start = time.perf_counter()
        with amp:
            total = avc_training_losses(model, images, labels)["total"]
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step > 0:  # the first step is warm-up
            elapsed += time.perf_counter() - start
    return args.train_steps * args.batch_size / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width_mult", type=float, default=0.25)
    parser.add_argument("--image_size", type=int, default=112)
    parser.add_argument("--num_images", type=int, default=8)
    parser.add_argument("--num_classes", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--train_steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = AVCNet(num_classes=args.num_classes, width_mult=args.width_mult).to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    images = [torch.randn(3, args.image_size, args.image_size - 16 * (index % 2)) for index in range(args.num_images)]
    scales = (0.5, 1.0, 1.5, 2.0)
    batched_rate, batched = time_inference(model, images, scales, device, batched=True)
    single_rate, single = time_inference(model, images, scales, device, batched=False)
    difference = max(float((a - b).abs().max()) for a, b in zip(batched, single))
    print(f"device {device}, width {args.width_mult}, image {args.image_size}, threads {torch.get_num_threads()}")
    print(f"seed inference (4 scales x flip): batched {batched_rate:.2f} images/s, "
          f"one forward per view {single_rate:.2f} images/s, ratio {batched_rate / single_rate:.2f}x "
          f"(max |difference| {difference:.2e})")
    print(f"training (2 views, all AVC losses, batch {args.batch_size}): "
          f"{time_training(model, args, device):.2f} images/s")


if __name__ == "__main__":
    main()
