"""Images/s of one-image-at-a-time extraction vs the batched extractor, same images, same preset, one run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_extract.py --preset cpu-small --images 32

Images: real photos bundled with scikit-image (4 sizes), repeated and mirrored to --images. Weights: the
shared ImageNet MobileNetV2 features for mobilenet presets when ../shared is there, else random init
(timing does not depend on the weights' values). On CUDA (when available) both modes also run with the
runtime options given (bf16 autocast, channels_last by default).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from skimage import data

from pipeline.config import RuntimeOptions, get_preset
from pipeline.features import Extractor, ImageFeatures, build_extractor

SHARED_MOBILENET = (
    Path(__file__).resolve().parents[2] / "shared" / "weights" / "mobilenetv2_imagenet_features.pt"
)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")  # 512×512, 400×600, 300×451, 427×640


def benchmark_images(count: int) -> list[torch.Tensor]:
    """``count`` uint8 (3, H, W) images cycling over the photos, every other cycle mirrored."""
    photos = [
        torch.from_numpy(np.ascontiguousarray(getattr(data, name)())).permute(2, 0, 1) for name in PHOTOS
    ]
    images = []
    for i in range(count):
        photo = photos[i % len(photos)]
        images.append(photo.flip(-1).contiguous() if (i // len(photos)) % 2 else photo)
    return images


def timed(run: Callable[[], list[ImageFeatures]], device: torch.device) -> tuple[float, list[ImageFeatures]]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def compare(extractor: Extractor, images: list[torch.Tensor], repeats: int) -> None:
    """Best of ``repeats`` timings per mode, alternating which mode goes first (the machine is shared)."""
    device = extractor.device
    extractor.extract(images[:2])  # warm-up: allocator, kernels
    modes = {
        "one at a time": lambda: [extractor.extract_single(image) for image in images],
        "batched": lambda: extractor.extract(images),
    }
    best: dict[str, float] = {}
    outputs: dict[str, list[ImageFeatures]] = {}
    for r in range(repeats):
        for mode in list(modes) if r % 2 == 0 else list(modes)[::-1]:
            seconds, outputs[mode] = timed(modes[mode], device)
            best[mode] = min(seconds, best.get(mode, float("inf")))
    pairs = list(zip(outputs["one at a time"], outputs["batched"], strict=True))
    worst = min(float(a.global_descriptor @ b.global_descriptor) for a, b in pairs)
    same_counts = all(len(a.scores) == len(b.scores) for a, b in pairs)
    n, single_s = len(images), best["one at a time"]
    runtime = extractor.runtime
    label = (
        f"{device.type} bs={runtime.batch_size} px<={runtime.max_batch_pixels} autocast={runtime.autocast}"
    )
    for mode, seconds in best.items():
        print(f"| {label} | {mode} | {seconds:.2f} | {n / seconds:.2f} | {single_s / seconds:.2f} |")
    print(f"  check: min global cosine single vs batched {worst:.6f}, same local counts: {same_counts}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-batch-pixels", type=int, default=0, help="RuntimeOptions.max_batch_pixels")
    parser.add_argument("--repeats", type=int, default=2, help="timings per mode; the best is reported")
    parser.add_argument("--cuda-autocast", default="bf16", choices=["none", "bf16", "fp16"])
    args = parser.parse_args()

    config = get_preset(args.preset)
    weights = (
        str(SHARED_MOBILENET) if config.backbone == "mobilenet_v2" and SHARED_MOBILENET.exists() else None
    )
    images = benchmark_images(args.images)
    shapes = sorted({tuple(image.shape[1:]) for image in images})
    print(
        f"preset {args.preset}, {len(images)} images of shapes {shapes}, weights: {weights or 'random init'}"
    )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print("| device / runtime | mode | seconds | images/s | speed-up |")
    print("|---|---|---|---|---|")
    runs = [("cpu", RuntimeOptions(batch_size=args.batch_size, max_batch_pixels=args.max_batch_pixels))]
    if torch.cuda.is_available():
        cuda = RuntimeOptions(
            batch_size=args.batch_size,
            max_batch_pixels=args.max_batch_pixels,
            autocast=args.cuda_autocast,
            channels_last=True,
        )
        runs.append(("cuda", cuda))
    for device, runtime in runs:
        torch.manual_seed(0)
        compare(build_extractor(config, weights, device=device, runtime=runtime), images, args.repeats)


if __name__ == "__main__":
    main()
