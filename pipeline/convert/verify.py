"""The check that a converted model extracts what the reference does: features of the TF SavedModel and of
the converted weights compared on the same photos, and the reference variant a model file is."""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline import storage
from pipeline.config import ATTENTION_INPUTS, AUTOENCODER_ACTIVATIONS, ExtractionConfig
from pipeline.convert.checkpoints import _tensorflow
from pipeline.errors import MissingInputError
from pipeline.features import ImageFeatures, build_extractor
from pipeline.model.weights import VARIANT_SETTINGS, write_model_settings

# The reference extractor's end-points for TF1 graphs (extractor.py: model.prune(feeds, fetches)), in order.
FEEDS = ("input_image", "input_scales", "input_abs_thres", "input_max_feature_num", "input_global_scales_ind")
FETCHES = ("boxes", "features", "scales", "scores", "global_descriptors")


def reference_features(saved_model: str, image: np.ndarray, config: ExtractionConfig) -> ImageFeatures:
    """Features of ``image`` ((H, W, 3) uint8 RGB) by the SavedModel's own graph, fed and post-processed as
    the reference's extractor does: a TF1 graph pruned to its end-points, a TF2 export through its serving
    signature; PIL cap, per-scale L2 → sum → L2 global, L2 local descriptors, box centres divided by the
    capping factors."""
    if not (Path(saved_model) / "saved_model.pb").exists():
        raise MissingInputError(f"{saved_model} is not a SavedModel directory (no saved_model.pb)")
    tf = _tensorflow()
    loaded = tf.saved_model.load(saved_model)
    capped, factors = _reference_cap(image, config.max_side)
    inputs = {
        "input_image": tf.constant(capped),
        "input_scales": tf.constant(config.scales, dtype=tf.float32),
        "input_abs_thres": tf.constant(config.attention_threshold, dtype=tf.float32),
        "input_max_feature_num": tf.constant(config.max_local_features, dtype=tf.int32),
        "input_global_scales_ind": tf.constant(
            [config.scales.index(s) for s in config.global_scales], dtype=tf.int32
        ),
    }
    if hasattr(loaded, "prune"):  # a TF1 SavedModel: the reference extractor prunes it
        run = loaded.prune(feeds=[f"{name}:0" for name in FEEDS], fetches=[f"{name}:0" for name in FETCHES])
        out = dict(zip(FETCHES, run(*(inputs[name] for name in FEEDS)), strict=True))
    else:
        out = loaded.signatures["serving_default"](**inputs)
    boxes = out["boxes"].numpy()  # (N, 4) y0, x0, y1, x1 in capped pixels
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2 / factors  # (N, 2) y, x
    per_scale = _l2(out["global_descriptors"].numpy())
    return ImageFeatures(
        global_descriptor=_l2(per_scale.sum(axis=0)).astype(np.float32),
        keypoints=centres[:, ::-1].astype(np.float32),
        scales=(1.0 / out["scales"].numpy()).astype(np.float32),  # the reference stores 1 / scale
        scores=out["scores"].numpy().reshape(-1).astype(np.float32),
        descriptors=_l2(out["features"].numpy()).astype(np.float32),
    )


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(min=1e-12)


def _reference_cap(image: np.ndarray, max_side: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference's ResizeImage: PIL bilinear to round(side · max_side / longest) when the longest side
    is larger; returns the image and the (h, w) factors its keypoints are divided by."""
    height, width = image.shape[:2]
    if max(height, width) <= max_side:
        return image, np.ones(2)
    factor = max_side / max(height, width)
    size = (round(width * factor), round(height * factor))
    resized = np.asarray(Image.fromarray(image).resize(size, resample=Image.Resampling.BILINEAR))
    return resized, np.array([size[1] / height, size[0] / width])


# --- verification --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    global_cosine: float
    reference_keypoints: int
    converted_keypoints: int
    matched: int  # reference keypoints with a converted one at the same scale within max_distance
    max_distance: float  # of the matched pairs, pixels
    max_score_error: float  # relative, of the matched pairs
    max_descriptor_error: float  # max |difference| of unit descriptors, of the matched pairs

    def passes(self, min_cosine: float = 0.9999, min_matched: float = 0.99, max_error: float = 1e-3) -> bool:
        share = self.matched / self.reference_keypoints if self.reference_keypoints else 1.0
        return (
            self.global_cosine >= min_cosine
            and share >= min_matched
            and self.max_score_error <= max_error
            and self.max_descriptor_error <= max_error
        )


def compare_features(
    reference: ImageFeatures, converted: ImageFeatures, max_distance: float = 0.5
) -> Comparison:
    """Pairs each reference keypoint with the nearest converted one of the same scale (≤ max_distance px)."""
    same_scale = np.isclose(reference.scales[:, None], converted.scales[None, :], rtol=1e-4)
    distance = np.linalg.norm(reference.keypoints[:, None] - converted.keypoints[None], axis=-1)
    distance = np.where(same_scale, distance, np.inf)  # (N_ref, N_conv)
    nearest = distance.argmin(axis=1) if distance.size else np.zeros(0, dtype=int)
    matched = np.flatnonzero(distance[np.arange(len(nearest)), nearest] <= max_distance)
    pairs = nearest[matched]
    ref_scores, conv_scores = reference.scores[matched], converted.scores[pairs]
    return Comparison(
        global_cosine=float(reference.global_descriptor @ converted.global_descriptor),
        reference_keypoints=len(reference.scores),
        converted_keypoints=len(converted.scores),
        matched=len(matched),
        max_distance=float(distance[matched, pairs].max(initial=0.0)),
        max_score_error=float((np.abs(ref_scores - conv_scores) / np.abs(ref_scores)).max(initial=0.0)),
        max_descriptor_error=float(
            np.abs(reference.descriptors[matched] - converted.descriptors[pairs]).max(initial=0.0)
        ),
    )


def _read_rgb(image_url: str, options: storage.Options) -> np.ndarray:
    with Image.open(io.BytesIO(storage.read_bytes(image_url, options))) as image:
        return np.asarray(image.convert("RGB"))  # as the reference's RgbLoader: no EXIF rotation


def _converted_features(
    pixels: np.ndarray, weights: str, config: ExtractionConfig, options: storage.Options
) -> ImageFeatures:
    extractor = build_extractor(config, weights, options, device="cpu")
    return extractor.extract_single(torch.from_numpy(pixels.copy()).permute(2, 0, 1))


def verify_conversion(
    saved_model: str, weights: str, image_url: str, config: ExtractionConfig, options: storage.Options = None
) -> Comparison:
    """Run the SavedModel's own graph and the converted PyTorch extractor (``weights``) on the same image
    with ``config``'s settings, and compare what they extract."""
    pixels = _read_rgb(image_url, options)
    reference = reference_features(saved_model, pixels, config)
    return compare_features(reference, _converted_features(pixels, weights, config, options))


def variants(config: ExtractionConfig) -> list[ExtractionConfig]:
    """``config`` first, then every other combination of the VARIANT_SETTINGS values."""
    combos = [
        dataclasses.replace(config, attention_input=attention, autoencoder_activation=activation)
        for attention in ATTENTION_INPUTS
        for activation in AUTOENCODER_ACTIVATIONS
    ]
    return [config, *(c for c in combos if c != config)]


def variant_label(config: ExtractionConfig) -> str:
    return ", ".join(f"{name}={getattr(config, name)}" for name in VARIANT_SETTINGS)


def detect_variant(
    saved_model: str, weights: str, image_url: str, config: ExtractionConfig, options: storage.Options = None
) -> tuple[ExtractionConfig | None, dict[str, Comparison]]:
    """Try every variant of ``config`` (variants) against the SavedModel's own graph on one image; returns
    the first that reproduces it (None: none does) and every variant's comparison, by variant_label. The
    one found is recorded beside the weights (write_model_settings): extraction with them applies it."""
    pixels = _read_rgb(image_url, options)
    reference = reference_features(saved_model, pixels, config)
    found, comparisons = None, {}
    for variant in variants(config):
        comparison = compare_features(reference, _converted_features(pixels, weights, variant, options))
        comparisons[variant_label(variant)] = comparison
        if found is None and comparison.passes():
            found = variant
    if found is not None:
        write_model_settings(weights, found, detected=True, options=options)
    return found, comparisons
