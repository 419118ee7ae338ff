"""Multi-scale batched extraction: equivalence batched = single, aggregation, selection, geometry, inputs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.config import ExtractionConfig, RuntimeOptions, get_preset
from pipeline.features import Extractor, ImageFeatures, build_extractor, pil_bilinear
from tests.models import calibrated_model

SMALL = get_preset("cpu-small")


def random_image(height: int, width: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)


def extractor_for(config: ExtractionConfig = SMALL, **runtime) -> Extractor:
    return Extractor(calibrated_model(config), config, RuntimeOptions(**runtime), device="cpu")


def sorted_rows(features: ImageFeatures) -> np.ndarray:
    """Features in a canonical order (x, y, scale) so near-tied scores cannot reorder them."""
    return np.lexsort((features.scales, features.keypoints[:, 1], features.keypoints[:, 0]))


def assert_same_features(a: ImageFeatures, b: ImageFeatures) -> None:
    assert float(a.global_descriptor @ b.global_descriptor) > 1 - 1e-4
    ia, ib = sorted_rows(a), sorted_rows(b)
    np.testing.assert_array_equal(a.keypoints[ia], b.keypoints[ib])
    np.testing.assert_array_equal(a.scales[ia], b.scales[ib])
    np.testing.assert_allclose(a.scores[ia], b.scores[ib], rtol=1e-4)
    np.testing.assert_allclose(a.descriptors[ia], b.descriptors[ib], atol=1e-4)


def test_batched_equals_one_at_a_time_on_a_mix_of_shapes() -> None:
    config = dataclasses.replace(SMALL, max_local_features=60)  # the top-K cut is active
    extractor = extractor_for(config, batch_size=3)
    shapes = [(120, 160), (160, 120), (120, 160), (300, 200), (120, 160), (160, 120), (120, 160), (90, 90)]
    images = [random_image(h, w, seed) for seed, (h, w) in enumerate(shapes)]
    bboxes = [None] * len(images)
    bboxes[4] = (10.5, 5.0, 150.0, 100.2)  # cropped: capped shape differs from its uncropped twins
    batched = extractor.extract(images, bboxes)
    assert len(batched) == len(images)
    # a pixel budget of two 120 × 160 images splits the batches of three into forward passes of two
    budgeted = extractor_for(config, batch_size=3, max_batch_pixels=2 * 120 * 160).extract(images, bboxes)
    for image, bbox, features, split in zip(images, bboxes, batched, budgeted, strict=True):
        single = extractor.extract_single(image, bbox)
        assert_same_features(features, single)
        assert_same_features(split, single)
    # top-K cut everywhere except the 90 × 90 image: 4 × 4 + 6 × 6 locations over its two scales
    assert [len(f.scores) for f in batched] == [60] * 7 + [52]
    assert float(batched[0].global_descriptor @ batched[2].global_descriptor) < 0.999  # not degenerate


def test_global_is_the_normalised_sum_of_normalised_scale_descriptors() -> None:
    config = dataclasses.replace(
        SMALL, max_side=128, scales=(0.5, 0.70711, 1.0), global_scales=(0.70711, 1.0)
    )
    extractor = extractor_for(config)
    image = random_image(200, 150, seed=3)  # capped to 128 × 96 with PIL's antialiased bilinear, on uint8
    pil = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((96, 128), Image.Resampling.BILINEAR)
    capped = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)[None].float()
    mean, std = (
        torch.tensor(config.pixel_mean).view(1, 3, 1, 1),
        torch.tensor(config.pixel_std).view(1, 3, 1, 1),
    )
    total = torch.zeros(config.global_dim)
    for scale in config.global_scales:
        size = (round(128 * scale), round(96 * scale))
        x = F.interpolate(capped, size=size, mode="bilinear", align_corners=False)
        with torch.no_grad():
            g = extractor.model.extract((x - mean) / std).global_descriptor[0]
        total += g / g.norm()
    expected = (total / total.norm()).numpy()
    got = extractor.extract_single(image).global_descriptor
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert got.dtype == np.float32 and got.shape == (1280,)


def test_threshold_and_top_k_select_over_all_scales() -> None:
    everything = dataclasses.replace(SMALL, max_local_features=100_000)
    model_config = everything
    image = random_image(128, 96, seed=5)
    model = calibrated_model(model_config)
    all_features = Extractor(model, everything, device="cpu").extract_single(image)
    maps = {0.70711: (6, 5), 1.0: (8, 6)}  # 91 × 68 and 128 × 96 inputs, each stride-2 layer ceil-halves
    assert len(all_features.scores) == sum(h * w for h, w in maps.values())
    assert np.all(np.diff(all_features.scores) <= 0)  # descending
    threshold = float(np.median(all_features.scores))
    kept = Extractor(model, dataclasses.replace(everything, attention_threshold=threshold), device="cpu")
    kept_features = kept.extract_single(image)
    np.testing.assert_array_equal(kept_features.scores, all_features.scores[all_features.scores >= threshold])
    top = Extractor(
        model, dataclasses.replace(everything, attention_threshold=threshold, max_local_features=7)
    )
    top_features = top.extract_single(image)
    np.testing.assert_array_equal(top_features.scores, all_features.scores[:7])
    np.testing.assert_array_equal(top_features.keypoints, all_features.keypoints[:7])
    assert set(all_features.scales.tolist()) == {np.float32(0.70711), 1.0}  # both scales contribute


def test_keypoints_at_scale_one_are_the_receptive_field_grid() -> None:
    config = dataclasses.replace(SMALL, scales=(1.0,), global_scales=(1.0,), max_local_features=1000)
    features = extractor_for(config).extract_single(random_image(64, 96, seed=1))
    expected = {(16.0 * c, 16.0 * r) for r in range(4) for c in range(6)}  # offset 0, stride 16
    assert {tuple(p) for p in features.keypoints.tolist()} == expected


def test_capping_maps_keypoints_back_to_original_pixels() -> None:
    config = dataclasses.replace(SMALL, scales=(1.0,), global_scales=(1.0,), max_local_features=1000)
    features = extractor_for(config).extract_single(
        random_image(384, 512, seed=2)
    )  # capped ×0.5 to 192 × 256
    # as the reference: centre 16 c in capped pixels, divided by the capping factor 0.5
    expected = {(32.0 * c, 32.0 * r) for r in range(12) for c in range(16)}
    assert {tuple(p) for p in features.keypoints.tolist()} == expected


def test_bbox_crop_keypoints_are_in_original_coordinates() -> None:
    extractor = extractor_for()
    image = random_image(180, 240, seed=4)
    cropped = extractor.extract_single(
        image, bbox=(30.4, 20.0, 199.2, 150.5)
    )  # round(): x 30..198, y 20..149
    manual = extractor.extract_single(image[:, 20:150, 30:199].contiguous())
    np.testing.assert_allclose(cropped.global_descriptor, manual.global_descriptor, atol=1e-6)
    np.testing.assert_allclose(cropped.keypoints, manual.keypoints + np.array([30.0, 20.0]), atol=1e-4)
    np.testing.assert_allclose(cropped.descriptors, manual.descriptors, atol=1e-6)
    assert cropped.keypoints[:, 0].min() >= 30 - 0.5 and cropped.keypoints[:, 1].min() >= 20 - 0.5


def test_output_types_and_normalisation() -> None:
    features = extractor_for().extract_single(random_image(100, 140, seed=6))
    n = len(features.scores)
    assert 0 < n <= SMALL.max_local_features
    for array, shape in [
        (features.global_descriptor, (1280,)),
        (features.keypoints, (n, 2)),
        (features.scales, (n,)),
        (features.scores, (n,)),
        (features.descriptors, (n, 128)),
    ]:
        assert array.dtype == np.float32 and array.shape == shape
    np.testing.assert_allclose(np.linalg.norm(features.descriptors, axis=1), 1.0, atol=1e-5)
    assert abs(np.linalg.norm(features.global_descriptor) - 1.0) < 1e-5


def test_channels_last_and_bf16_autocast_paths_agree_with_float32() -> None:
    image = random_image(96, 128, seed=7)
    reference = extractor_for().extract_single(image)
    assert_same_features(extractor_for(channels_last=True).extract_single(image), reference)
    bf16 = extractor_for(autocast="bf16").extract_single(image)
    assert float(bf16.global_descriptor @ reference.global_descriptor) > 0.99
    assert bf16.descriptors.dtype == np.float32 and bf16.descriptors.shape[1] == 128


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (torch.zeros(3, 32, 32), r"image 0 has dtype torch.float32; expected torch.uint8"),
        (torch.zeros(4, 32, 32, dtype=torch.uint8), r"image 0 has shape \(4, 32, 32\); expected \(3, H, W\)"),
        (torch.zeros(32, 32, 3, dtype=torch.uint8), r"shape \(32, 32, 3\)"),
        (torch.zeros(32, 32, dtype=torch.uint8), r"shape \(32, 32\)"),
        (torch.zeros(3, 0, 32, dtype=torch.uint8), r"shape \(3, 0, 32\)"),
        (np.zeros((3, 32, 32), np.uint8), "image 0 is a ndarray; expected a uint8 torch.Tensor"),
    ],
)
def test_bad_images_are_rejected(image: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        extractor_for().extract([image])  # type: ignore[list-item]


@pytest.mark.parametrize(
    "bbox",
    [(-1.0, 0.0, 10.0, 10.0), (0.0, 0.0, 65.0, 10.0), (10.0, 10.0, 10.0, 20.0), (20.0, 0.0, 10.0, 10.0),
     (0.0, 0.0, float("nan"), 10.0), (0.0, 0.0, 10.0)],
)  # fmt: skip
def test_bad_bboxes_are_rejected(bbox: tuple) -> None:
    with pytest.raises(ValueError, match="bbox"):
        extractor_for().extract_single(random_image(48, 64, seed=0), bbox)


def test_other_bad_arguments() -> None:
    extractor = extractor_for()
    with pytest.raises(ValueError, match="got 1 bboxes for 2 images"):
        extractor.extract([random_image(32, 32, 0), random_image(32, 32, 1)], [None])
    with pytest.raises(ValueError, match=r"unknown preset 'delg-r49'; available: \['cpu-small'"):
        build_extractor("delg-r49")
    with pytest.raises(ValueError, match=r"model does not match the config: model has \{'local_dim': 128\}"):
        Extractor(extractor.model, dataclasses.replace(SMALL, local_dim=64))
    assert extractor.extract([]) == []


def test_full_resnet50_with_the_reference_preset() -> None:
    config = get_preset("delg-r50-gldv2")
    extractor = build_extractor(config, device="cpu")  # random init: absolute threshold keeps little
    assert extractor.weights_id == "random" and not extractor.model.training
    image = random_image(72, 96, seed=8)
    features = extractor.extract_single(image)
    assert features.global_descriptor.shape == (2048,) and features.descriptors.shape[1] == 128
    assert abs(np.linalg.norm(features.global_descriptor) - 1.0) < 1e-5
    assert bool(np.all(features.scores >= 454.6))
    loose = Extractor(extractor.model, dataclasses.replace(config, attention_threshold=0.0)).extract_single(
        image
    )
    # 7 scales of a 72 × 96 image (18 × 24 … 144 × 192), tf-slim stride-32 maps (every stride-2 layer
    # rounds up: ceil(side / 32)) of 1×1, 1×2, 2×2, 2×3, 3×3, 4×5, 5×6 locations
    assert len(loose.scores) == 1 + 2 + 4 + 6 + 9 + 20 + 30
    np.testing.assert_allclose(loose.global_descriptor, features.global_descriptor, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(loose.descriptors, axis=1), 1.0, atol=1e-5)
    assert set(loose.scales.tolist()) <= {np.float32(s) for s in config.scales}
    assert loose.keypoints[:, 0].max() <= 96 and loose.keypoints[:, 1].max() <= 72


def test_a_crop_keeps_the_scale_of_its_image() -> None:
    """As the reference: a crop is capped at max_side · (crop side / image side), here 256 · 300 / 600 = 128,
    with PIL's bilinear on uint8; its keypoints are divided by the capping factors of each axis."""
    extractor = extractor_for(dataclasses.replace(SMALL, max_local_features=1000))
    image = random_image(200, 600, seed=9)
    cropped = extractor.extract_single(image, bbox=(299.5, 0.0, 599.5, 200.0))  # round(): x 300..599
    capped = pil_bilinear(image[:, :, 300:600].contiguous(), (85, 128))  # 200 · 128 / 300 = 85.3
    manual = extractor.extract_single(capped)  # 85 × 128 ≤ 256: not capped again
    np.testing.assert_allclose(cropped.global_descriptor, manual.global_descriptor, atol=1e-6)
    np.testing.assert_allclose(cropped.descriptors, manual.descriptors, atol=1e-6)
    expected = manual.keypoints.astype(np.float64) / [128 / 300, 85 / 200] + [300, 0]
    np.testing.assert_allclose(cropped.keypoints, expected, rtol=1e-6)
