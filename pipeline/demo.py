"""The embedded demo dataset: real photos bundled with scikit-image under synthetic viewpoint changes.

A fresh clone can run the whole pipeline on it without network. Each source photo plays a "landmark":
the index holds several random homographic views of it, the queries are further views, and the ground
truth says which index images show the same photo (GLDv2 retrieval solution format).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.errors import ConfigError
from pipeline.runconfig import RunConfig, load_run_config

log = logging.getLogger(__name__)

# Colour and grey photos shipped inside scikit-image (no download needed).
DEMO_PHOTOS = (
    "astronaut",
    "camera",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
)
MAX_SIDE = 480  # small enough for a CPU run of the whole pipeline in a few minutes


@dataclass(frozen=True)
class DemoDataset:
    index_manifest: str  # Parquet manifest of the index images
    query_manifest: str  # Parquet manifest of the query images
    ground_truth: str  # GLDv2 retrieval solution CSV: id,images,Usage
    landmarks: str  # Parquet id → landmark_id of the index images


def _photo(name: str) -> np.ndarray:
    """(H, W, 3) uint8, capped at MAX_SIDE."""
    from skimage import data, transform

    image = getattr(data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    image = image[..., :3]
    scale = MAX_SIDE / max(image.shape[:2])
    if scale < 1:
        image = transform.rescale(image, scale, channel_axis=-1, anti_aliasing=True, preserve_range=True)
    return image.astype(np.uint8)


def random_view(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A synthetic viewpoint change: rotation, zoom, shift and a mild perspective tilt."""
    from skimage import transform

    h, w = image.shape[:2]
    centre = np.array([w / 2, h / 2])
    angle = rng.uniform(-0.25, 0.25)
    zoom = rng.uniform(0.8, 1.25)
    shift = rng.uniform(-0.08, 0.08, 2) * [w, h]
    tilt = rng.uniform(-4e-4, 4e-4, 2)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) * zoom
    matrix = np.eye(3)
    matrix[:2, :2] = rot
    matrix[:2, 2] = centre + shift - rot @ centre
    matrix[2, :2] = tilt / max(h, w) * 100
    warped = transform.warp(
        image, transform.ProjectiveTransform(matrix).inverse, preserve_range=True, mode="edge"
    )
    return warped.astype(np.uint8)


def _jpeg(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_demo_dataset(
    out_url: str, views: int = 4, seed: int = 0, options: storage.Options = None
) -> DemoDataset:
    """Write images, manifests and ground truth under ``out_url``; deterministic for a seed."""
    if views < 1:
        raise ConfigError(f"views={views}; must be ≥ 1")
    rng = np.random.default_rng(seed)
    index_rows: list[dict[str, str]] = []
    query_rows: list[dict[str, str]] = []
    truth: list[str] = ["id,images,Usage"]
    for name in DEMO_PHOTOS:
        photo = _photo(name)
        names = []
        for view in range(views):
            image_id = f"{name}-{view}"
            url = f"images/{image_id}.jpg"  # relative to the manifest: the folder can move
            storage.write_bytes(storage.join(out_url, url), _jpeg(random_view(photo, rng)), options)
            index_rows.append({"id": image_id, "url": url, "landmark_id": name})
            names.append(image_id)
        query_id = f"query-{name}"
        url = f"images/{query_id}.jpg"
        storage.write_bytes(storage.join(out_url, url), _jpeg(random_view(photo, rng)), options)
        query_rows.append({"id": query_id, "url": url, "landmark_id": name})
        truth.append(f"{query_id},{' '.join(names)},Public")

    dataset = DemoDataset(
        index_manifest=storage.join(out_url, "index.parquet"),
        query_manifest=storage.join(out_url, "queries.parquet"),
        ground_truth=storage.join(out_url, "ground_truth.csv"),
        landmarks=storage.join(out_url, "landmarks.parquet"),
    )
    for url, rows in ((dataset.index_manifest, index_rows), (dataset.query_manifest, query_rows)):
        storage.write_parquet(
            url, pa.Table.from_pylist([{"id": r["id"], "url": r["url"]} for r in rows]), options
        )
    storage.write_parquet(
        dataset.landmarks,
        pa.Table.from_pylist([{"id": r["id"], "landmark_id": r["landmark_id"]} for r in index_rows]),
        options,
    )
    storage.write_text(dataset.ground_truth, "\n".join(truth) + "\n", options)
    return dataset


DEMO_CONFIG = """\
# landmark-index run config for the embedded demo (every key: docs/configuration.md, configs/example.toml)
out = "."

[data]
index = "data/index.parquet"
queries = "data/queries.parquet"
ground_truth = "data/ground_truth.csv"
protocol = "gldv2-retrieval"

[extract]
preset = "{preset}"
weights = "{weights}"
shard_size = 16

[search]
k = {k}

[rerank]
top = {k}

[report]
max_queries = {queries}
"""


# ImageNet MobileNetV2 features shipped beside the checkout (../shared); no network needed.
SHARED_WEIGHTS = (
    Path(__file__).resolve().parents[2] / "shared" / "weights" / "mobilenetv2_imagenet_features.pt"
)


def default_demo_model() -> tuple[str, str]:
    """(preset, weights) for the demo: the shared ImageNet backbone when present, else random init."""
    if SHARED_WEIGHTS.is_file():
        return "delg-mobilenetv2-imagenet", str(SHARED_WEIGHTS)
    log.warning(
        "%s not found: the demo runs with random weights and its figures mean nothing", SHARED_WEIGHTS
    )
    return "cpu-small", ""


def write_demo(
    out_dir: str, views: int = 4, preset: str | None = None, weights: str | None = None
) -> RunConfig:
    """Write the demo dataset and its run config (``out_dir/demo.toml``) to a local folder; return the config."""
    if not storage.is_local(out_dir):
        raise ConfigError(f"the demo writes to a local folder, got {storage.redact(out_dir)}")
    if preset is None:
        preset, weights = default_demo_model()
    if not storage.exists(storage.join(out_dir, "data", "ground_truth.csv")):
        make_demo_dataset(storage.join(out_dir, "data"), views=views)
    config_url = storage.join(out_dir, "demo.toml")
    text = DEMO_CONFIG.format(
        preset=preset, weights=weights or "", k=views * len(DEMO_PHOTOS), queries=len(DEMO_PHOTOS)
    )
    storage.write_text(config_url, text)
    return load_run_config(config_url)
