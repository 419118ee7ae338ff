"""Fetch the public multi-view photo sets of bench_rerank_datasets.py and downscale them (max side 640, JPEG q85).

Their licences do not allow copies in this repository (see README.md here), so this script rebuilds them from
the pinned commits of their public repositories:

    python benchmarks/data/fetch_multiview.py OUT            # git clone from GitHub
    python benchmarks/data/fetch_multiview.py OUT --mirrors DIR   # or read DIR/<owner>+<name>/repo git dirs

OUT/<set>/images/*.jpg, OUT/<set>/labels.csv (id, file, group) and, for boat, OUT/boat/H1to<k>p: the
published homographies rescaled to the downscaled images (map img1 pixels to img<k> pixels).
"""

from __future__ import annotations

import argparse
import csv
import io
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

MAX_SIDE = 640
QUALITY = 85
# the Monstree photos used (23 of 41: those the measuring machine's mirror held), so that a clone gives the same set
MONSTREE = {1025, 1027, 1028, 1029, 1036, 1037, 1038, 1040, 1041, 1042, 1044, 1046, 1047, 1048, 1049, 1050}
MONSTREE |= {1051, 1053, 1055, 1056, 1057, 1062, 1063}  # IMG_<n>.JPG
# set → (repository, commit, image paths' prefix, suffix)
SOURCES = {
    "sceaux": (
        "openMVG/ImageDataset_SceauxCastle",
        "fde7f5faba555e3c54700477c304488613346a19",
        "images/",
        ".JPG",
    ),
    "monstree": ("alicevision/dataset_monstree", "c697b936be47d6b78ce58d7eb4188e6908503ee2", "full/", ".JPG"),
    "boat": (
        "NLeSC/LargeScaleImaging",
        "61183f5342a77b5d91aa8663e0cd01c73949447c",
        "Data/AffineRegions/boat/",
        ".pgm",
    ),
}


def git(git_dir: Path, *args: str) -> bytes:
    return subprocess.run(["git", f"--git-dir={git_dir}", *args], check=True, capture_output=True).stdout


def repository(repo: str, mirrors: Path | None, scratch: Path) -> Path:
    if mirrors is not None:
        return mirrors / repo.replace("/", "+") / "repo"
    target = scratch / repo.replace("/", "+")
    subprocess.run(["git", "clone", "--bare", f"https://github.com/{repo}", str(target)], check=True)
    return target


def blob(git_dir: Path, commit: str, path: str) -> bytes | None:
    """A file's bytes at ``commit``; None when the copy lacks it (large files left out of a mirror)."""
    try:
        return git(git_dir, "cat-file", "blob", f"{commit}:{path}")
    except subprocess.CalledProcessError:
        return None


def downscale(data: bytes) -> tuple[Image.Image, float]:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    scale = min(1.0, MAX_SIDE / max(image.size))
    size = (round(image.width * scale), round(image.height * scale))
    return image.resize(size, Image.Resampling.LANCZOS) if scale < 1 else image, scale


def fetch_set(name: str, git_dir: Path, out: Path) -> int:
    _, commit, prefix, suffix = SOURCES[name]
    paths = git(git_dir, "ls-tree", "-r", "--name-only", commit, prefix).decode().split()
    (out / name / "images").mkdir(parents=True, exist_ok=True)
    rows, scale = [], 1.0
    for path in sorted(p for p in paths if p.endswith(suffix)):
        if name == "monstree" and int(Path(path).stem[4:]) not in MONSTREE:
            continue
        data = blob(git_dir, commit, path)
        if data is None or data.startswith(b"version https://git-lfs"):
            continue
        image, scale = downscale(data)
        image_id = f"{name}_{Path(path).stem}"
        image.save(out / name / "images" / f"{image_id}.jpg", quality=QUALITY)
        rows.append({"id": image_id, "file": f"images/{image_id}.jpg", "group": name})
    with (out / name / "labels.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["id", "file", "group"])
        writer.writeheader()
        writer.writerows(rows)
    if name == "boat":  # homographies of the downscaled images: S · H · S⁻¹
        s = np.diag([scale, scale, 1.0])
        for k in range(2, 7):
            h = np.loadtxt(io.BytesIO(git(git_dir, "cat-file", "blob", f"{commit}:{prefix}H1to{k}p")))
            np.savetxt(out / name / f"H1to{k}p", s @ h @ np.linalg.inv(s))
    return len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path)
    parser.add_argument(
        "--mirrors", type=Path, help="folder of <owner>+<name>/repo git dirs instead of cloning"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        for name, (repo, *_) in SOURCES.items():
            count = fetch_set(name, repository(repo, args.mirrors, Path(scratch)), args.out)
            print(f"{name}: {count} images from {repo}")


if __name__ == "__main__":
    main()
