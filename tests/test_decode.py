"""Decode tasks ship images already cropped and capped (issue 11): the exact path equals the runner capping the
full decode, the draft path (JPEG DCT scaling / reduce) keeps keypoints in original pixels, and a chunk holds at
most max_side² · 3 bytes of pixels per image whatever the photo's size."""

from __future__ import annotations

import dataclasses
import io
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from pipeline import images
from pipeline.config import RuntimeOptions, get_preset
from pipeline.extraction import DecodedChunk, ExtractionJob, decode_rows
from pipeline.features import Extractor, build_extractor, pil_bilinear, prepare_image
from tests.models import calibrated_model

SMALL = get_preset("cpu-small")
KEEP_ALL = dataclasses.replace(SMALL, attention_threshold=0.0, max_local_features=100_000)


def _smooth(height: int, width: int, seed: int = 0) -> Image.Image:
    low = np.random.default_rng(seed).integers(0, 256, (height // 64 + 1, width // 64 + 1, 3), dtype=np.uint8)
    return Image.fromarray(low).resize((width, height), Image.BICUBIC)


def _encoded(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def large_jpeg() -> bytes:
    return _encoded(_smooth(3000, 4000), "JPEG", quality=90)


def _decode(rows: list[dict], draft: bool, config=SMALL) -> DecodedChunk:
    # rows name files anywhere (the shared photos): the manifest-root policy is not what is tested here
    job = ExtractionJob("unused", "unused", config, decode_draft=draft, allow_local_outside_root=True)
    return decode_rows(pa.Table.from_pylist([{"url": None, "bbox": None, **row} for row in rows]), job, None)


def test_exact_decode_ships_the_crop_the_runner_would_cap() -> None:
    """PNG and JPEG without draft: the shipped pixels are exactly PIL's cap of the full decode (and of the crop,
    at the image's scale); origin and crop size are what the runner maps keypoints with."""
    png, jpeg = _encoded(_smooth(700, 500, 1), "PNG"), _encoded(_smooth(600, 900, 2), "JPEG")
    bbox = [100.4, 50.0, 400.0, 650.6]  # rounds to x 100..400, y 50..651
    chunk = _decode(
        [{"id": "p", "image": png}, {"id": "j", "image": jpeg}, {"id": "b", "image": png, "bbox": bbox}],
        False,
    )
    full_png, full_jpeg = images.decode_image(png), images.decode_image(jpeg)
    assert np.array_equal(chunk.images[0].pixels, pil_bilinear(full_png, (256, 183)).numpy())  # 500·256/700
    assert np.array_equal(chunk.images[1].pixels, pil_bilinear(full_jpeg, (171, 256)).numpy())  # 600·256/900
    crop = chunk.images[2]  # longest crop side 601 → capped at 256 · 601 / 700 = 219.8
    assert (crop.origin, crop.crop_size) == ((100, 50), (601, 300))
    assert np.array_equal(crop.pixels, pil_bilinear(full_png[:, 50:651, 100:400], (220, 110)).numpy())


def test_a_bbox_outside_its_image_is_a_decode_error_of_that_row() -> None:
    png = _encoded(_smooth(100, 100), "PNG")
    chunk = _decode(
        [{"id": "ok", "image": png}, {"id": "bad", "image": png, "bbox": [0.0, 0.0, 150.0, 50.0]}], True
    )
    assert chunk.ids == ["ok"]
    assert [(e.id, e.stage, e.reason) for e in chunk.errors] == [("bad", "decode", "bad_bbox")]
    assert "outside the 100x100 image" in chunk.errors[0].message


@pytest.mark.parametrize("draft", [False, True])
def test_bytes_shipped_are_bounded_by_max_side(large_jpeg: bytes, draft: bool) -> None:
    chunk = _decode([{"id": "big", "image": large_jpeg}], draft)
    bound = SMALL.max_side**2 * 3
    assert chunk.images[0].pixels.shape == (3, 192, 256) and chunk.images[0].crop_size == (3000, 4000)
    assert chunk.images[0].pixels.nbytes <= bound
    assert len(pickle.dumps(chunk, protocol=5)) <= bound + 1024  # pixels plus a little metadata


def test_draft_decodes_in_the_dct_domain_never_below_the_capped_size(large_jpeg: bytes) -> None:
    reduced = images.decode_reduced(large_jpeg, 256)
    assert reduced.full_size == (3000, 4000)
    assert tuple(reduced.pixels.shape) == (3, 375, 500)  # 1/8: the largest DCT scale keeping ≥ 192 × 256
    png = images.decode_reduced(_encoded(_smooth(1000, 700), "PNG"), 256)
    assert png.full_size == (1000, 700) and tuple(png.pixels.shape) == (3, 334, 234)  # reduce(3): ≥ 256 × 179


def test_draft_keeps_exif_orientation_and_the_upright_full_size() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    stored = _smooth(1200, 1600)
    data = _encoded(stored, "JPEG", quality=95, exif=exif)
    reduced = images.decode_reduced(data, 256)
    assert reduced.full_size == (1600, 1200) and tuple(reduced.pixels.shape) == (3, 400, 300)  # 1/4 scale
    prepared = prepare_image(reduced.pixels, 256, full_size=reduced.full_size)
    exact = prepare_image(images.decode_image(data), 256)
    assert prepared.capped_size == exact.capped_size == (256, 192) and prepared.crop_size == (1600, 1200)
    assert np.abs(prepared.pixels.astype(int) - exact.pixels.astype(int)).mean() < 2  # same picture, upright


def test_keypoints_of_a_large_jpeg_stay_in_original_pixels(large_jpeg: bytes) -> None:
    """Exact path: the same features as extracting the full decode. Draft path: every feature location kept,
    so the keypoint sets must coincide exactly: same capped grid, same mapping to 4000 × 3000 pixels."""
    extractor = Extractor(calibrated_model(KEEP_ALL), KEEP_ALL, RuntimeOptions(), device="cpu")
    old = extractor.extract([images.decode_image(large_jpeg)])[0]
    exact = extractor.extract_prepared(_decode([{"id": "x", "image": large_jpeg}], False, KEEP_ALL).images)[0]
    draft = extractor.extract_prepared(_decode([{"id": "x", "image": large_jpeg}], True, KEEP_ALL).images)[0]
    np.testing.assert_array_equal(exact.global_descriptor, old.global_descriptor)
    np.testing.assert_array_equal(exact.keypoints, old.keypoints)
    np.testing.assert_array_equal(exact.descriptors, old.descriptors)
    assert (
        old.keypoints[:, 0].max() > 3000 and old.keypoints[:, 1].max() > 2000
    )  # original pixels, not capped

    def positions(f):
        return f.keypoints[np.lexsort((f.scales, f.keypoints[:, 1], f.keypoints[:, 0]))]

    np.testing.assert_array_equal(positions(draft), positions(old))


@pytest.mark.shared
def test_draft_global_descriptor_of_a_real_photo_is_close(shared_dir: Path) -> None:
    """8 MP photo, MobileNetV2 preset (max_side 512): draft decodes at 1/4 scale. Bound from
    benchmarks/bench_decode.py: min cosine 0.9909 over the 38 landmarks-mini photos."""
    config = get_preset("delg-mobilenetv2-imagenet")
    extractor = build_extractor(
        config, str(shared_dir / "weights" / "mobilenetv2_imagenet_features.pt"), device="cpu"
    )
    row = {"id": "h", "url": str(shared_dir / "data" / "landmarks-mini" / "images" / "holidays_100000.jpg")}
    exact, draft = (extractor.extract_prepared(_decode([row], d, config).images)[0] for d in (False, True))
    assert tuple(images.decode_reduced(Path(row["url"]).read_bytes(), 512).pixels.shape[1:]) == (816, 612)
    assert float(exact.global_descriptor @ draft.global_descriptor) >= 0.99
    assert not np.array_equal(exact.global_descriptor, draft.global_descriptor)  # the draft path did run


def test_prepare_refuses_a_bbox_on_a_reduced_image() -> None:
    with pytest.raises(ValueError, match="bbox needs the image at full size"):
        prepare_image(torch.zeros((3, 10, 10), dtype=torch.uint8), 8, (0, 0, 5, 5), full_size=(20, 20))
