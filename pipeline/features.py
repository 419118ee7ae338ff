"""Batched multi-scale DELG extraction (pure torch, no Ray, no I/O beyond loading weights).

Per image, as the TF reference (delf extractor.py + export_model_utils.py) does it: optional bbox crop (rounded
with round()) → cap the longest side at max_side, scaled by the crop's share of the full image (a crop keeps
its image's scale), with PIL's antialiased bilinear on uint8 (downscale only) → for each scale resize to
round(side · scale) (bilinear, no antialias, like tf.image.resize) → normalise → DELG.
Global: per-scale L2-normalised descriptors of the global scales, summed, L2-normalised again.
Local: all scales pooled, attention ≥ threshold, top-K by attention; keypoints are the reference's
receptive-box centres (offset + stride · i in scaled pixels) divided by the scale and by the capping
factor, plus the crop origin: ORIGINAL image pixels.

The crop and cap are :func:`prepare_image`, so a decode task can do them and ship the small capped crop
(:meth:`Extractor.extract_prepared`) instead of the full photo; the result is the same either way.
Images with the same capped shape have the same shape at every scale: they are grouped and run in
chunks of ``batch_size``. A single image is a batch of one through the same code.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline import storage
from pipeline.config import ExtractionConfig, RuntimeOptions, get_preset
from pipeline.errors import InputError
from pipeline.images import capped_size
from pipeline.model.delg import Delg, LocalAndGlobal
from pipeline.model.geometry import ReceptiveField
from pipeline.model.weights import load_pretrained

log = logging.getLogger(__name__)

BBox = tuple[float, float, float, float]  # (x0, y0, x1, y1) in original pixels, x1/y1 exclusive
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ImageFeatures:
    global_descriptor: np.ndarray  # (D,) float32, L2-normalised
    keypoints: np.ndarray  # (N, 2) float32, (x, y) in original image pixels
    scales: np.ndarray  # (N,) float32, pyramid scale each feature came from
    scores: np.ndarray  # (N,) float32, attention, descending
    descriptors: np.ndarray  # (N, local_dim) float32, L2-normalised rows


@dataclass(frozen=True)
class PreparedImage:
    """One image ready for the model: cropped to its bbox and capped at max_side, still uint8. Small enough to
    ship (a decode task prepares it, the extractor runs it); keypoints map back through origin and crop_size."""

    pixels: np.ndarray  # (3, h, w) uint8, C-contiguous (zero-copy through Ray's object store)
    origin: tuple[int, int]  # (x0, y0) of the crop in the original image
    crop_size: tuple[int, int]  # (h, w) of the crop in ORIGINAL pixels (pixels' size before capping)

    @property
    def capped_size(self) -> tuple[int, int]:
        return int(self.pixels.shape[1]), int(self.pixels.shape[2])


@dataclass
class _Accumulator:
    """Per-image results gathered over scales (local candidates on CPU, float64 keypoints)."""

    global_sum: torch.Tensor | None = None  # (D,)
    scores: list[np.ndarray] = field(default_factory=list)  # per scale (n,)
    keypoints: list[np.ndarray] = field(default_factory=list)  # per scale (n, 2)
    descriptors: list[np.ndarray] = field(default_factory=list)  # per scale (n, d)
    scales: list[np.ndarray] = field(default_factory=list)  # per scale (n,)


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """round(side · scale) in float32, halves to even: tf.round of the reference's float32 product."""
    size = np.rint(np.array([height, width], dtype=np.float32) * np.float32(scale))
    return max(1, int(size[0])), max(1, int(size[1]))


def pil_bilinear(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(3, h, w) uint8 → (3, *size) uint8 with PIL's antialiased bilinear resize (the reference caps its
    images with PIL, so this is PIL itself)."""
    if tuple(pixels.shape[-2:]) == size:
        return pixels
    image = Image.fromarray(pixels.permute(1, 2, 0).contiguous().cpu().numpy())
    resized = np.asarray(image.resize((size[1], size[0]), resample=Image.Resampling.BILINEAR))
    return torch.from_numpy(resized.copy()).permute(2, 0, 1)


def validate_image(image: object, index: int = 0) -> torch.Tensor:
    if not isinstance(image, torch.Tensor):
        raise ValueError(
            f"image {index} is a {type(image).__name__}; expected a uint8 torch.Tensor (3, H, W)"
        )
    if image.dtype != torch.uint8:
        raise ValueError(f"image {index} has dtype {image.dtype}; expected torch.uint8 (decoded RGB)")
    if image.ndim != 3 or image.shape[0] != 3 or image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(
            f"image {index} has shape {tuple(image.shape)}; expected (3, H, W) RGB with H, W > 0"
        )
    return image


def crop_bounds(bbox: BBox, height: int, width: int) -> tuple[int, int, int, int]:
    """Integer pixel bounds (x0, y0, x1, y1) of ``bbox``, each rounded with round() like the reference
    (halves to even); they must lie in the image."""
    if len(bbox) != 4 or not all(math.isfinite(v) for v in bbox):
        raise InputError(f"bbox {bbox!r} must be 4 finite numbers (x0, y0, x1, y1)")
    x0, y0, x1, y1 = (round(v) for v in bbox)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise InputError(
            f"bbox {tuple(bbox)} is empty or outside the {width}x{height} image; need 0 <= x0 < x1 <= {width} "
            f"and 0 <= y0 < y1 <= {height}"
        )
    return x0, y0, x1, y1


def prepare_image(
    image: torch.Tensor,
    max_side: int,
    bbox: BBox | None = None,
    full_size: tuple[int, int] | None = None,
    index: int = 0,
) -> PreparedImage:
    """Crop ``image`` to ``bbox`` and cap it as the reference does: the crop's longest side at
    max_side · (crop's longest side / image's longest side), PIL antialiased bilinear, downscale only.

    ``full_size`` (H, W): ``image`` is a reduced decode (JPEG draft / reduce) of an image of that size; the
    capped size and keypoint scale still come from the full size. Only whole images can be reduced.
    """
    image = validate_image(image, index)
    height, width = full_size or tuple(image.shape[-2:])
    if full_size is not None and bbox is not None:
        raise ValueError("a bbox needs the image at full size: crop bounds are original pixels")
    x0, y0, x1, y1 = (0, 0, width, height) if bbox is None else crop_bounds(bbox, height, width)
    # The reference caps a crop at max_side · (crop's longest side / image's longest side).
    crop_max_side = (max(y1 - y0, x1 - x0) / max(height, width)) * max_side
    capped = pil_bilinear(image[:, y0:y1, x0:x1], capped_size(y1 - y0, x1 - x0, crop_max_side))
    return PreparedImage(np.ascontiguousarray(capped.numpy()), (x0, y0), (y1 - y0, x1 - x0))


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) float → (B, C, *size), bilinear, half-pixel centres, no antialias (TF reference)."""
    if tuple(images.shape[-2:]) == size:
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=False)


def _to_original(
    index: np.ndarray, rf: ReceptiveField, scale: float, capped_side: int, crop_side: int, origin: int
) -> np.ndarray:
    """Feature index along one axis → original-image coordinate, as the reference maps its box centres:
    divided by the pyramid scale (float32, like its boxes), then by the capping factor (capped / crop
    side), plus the crop origin."""
    centre = (rf.offset + rf.stride * index.astype(np.float32)).astype(np.float32)  # scaled-image pixels
    return (centre / np.float32(scale)).astype(np.float64) / (capped_side / crop_side) + origin


class Extractor:
    """Runs a DELG model over images; ``extract`` batches, ``extract_single`` is the batch-of-one path."""

    def __init__(
        self,
        model: Delg,
        config: ExtractionConfig,
        runtime: RuntimeOptions | None = None,
        device: str | torch.device | None = None,
        weights_id: str = "random",
    ) -> None:
        self.config = config
        self.runtime = runtime or RuntimeOptions()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.weights_id = weights_id  # sha256 of the weights file (or what they were), for run metadata
        _check_model_matches(model, config)
        model = model.to(self.device).eval()
        if self.runtime.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.keypoint_field = model.keypoint_field()  # where keypoints are placed
        self._forward = torch.compile(model.extract, dynamic=True) if self.runtime.compile else model.extract
        self._mean = torch.tensor(config.pixel_mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(config.pixel_std, device=self.device).view(1, 3, 1, 1)

    def extract(
        self, images: Sequence[torch.Tensor], bboxes: Sequence[BBox | None] | None = None
    ) -> list[ImageFeatures]:
        """Features of each image (uint8 (3, H, W) RGB), in input order; shapes may differ."""
        bboxes = [None] * len(images) if bboxes is None else list(bboxes)
        if len(bboxes) != len(images):
            raise ValueError(
                f"got {len(bboxes)} bboxes for {len(images)} images; need one (or None) per image"
            )
        max_side = self.config.max_side
        return self.extract_prepared(
            [
                prepare_image(image, max_side, bbox, index=i)
                for i, (image, bbox) in enumerate(zip(images, bboxes, strict=True))
            ]
        )

    def extract_prepared(self, crops: Sequence[PreparedImage]) -> list[ImageFeatures]:
        """Features of images already cropped and capped by :func:`prepare_image` (at this config's
        max_side), in input order."""
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, crop in enumerate(crops):
            groups[crop.capped_size].append(i)
        results: list[ImageFeatures | None] = [None] * len(crops)
        size = self.runtime.batch_size
        with torch.inference_mode(), self._autocast():
            for indices in groups.values():
                for start in range(0, len(indices), size):
                    chunk = indices[start : start + size]
                    for i, features in zip(
                        chunk, self._extract_chunk([crops[i] for i in chunk]), strict=True
                    ):
                        results[i] = features
        return results  # type: ignore[return-value]  # every index was filled by its group

    def extract_single(self, image: torch.Tensor, bbox: BBox | None = None) -> ImageFeatures:
        return self.extract([image], [bbox])[0]

    def _autocast(self) -> torch.autocast:
        dtype = _AUTOCAST_DTYPES.get(self.runtime.autocast)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def _extract_chunk(self, crops: list[PreparedImage]) -> list[ImageFeatures]:
        """Crops sharing one capped shape → features, one forward pass per scale."""
        batch = torch.stack([self._capped(crop) for crop in crops])  # (B, 3, h, w) float, 0..255
        accumulators = [_Accumulator() for _ in crops]
        for scale in self.config.scales:
            with_global = scale in self.config.global_scales
            output = self._run_scale(batch, scale, with_global)
            for b, (crop, acc) in enumerate(zip(crops, accumulators, strict=True)):
                if output.global_descriptor is not None:
                    g = output.global_descriptor[b]  # (D,) already L2-normalised per scale
                    acc.global_sum = g if acc.global_sum is None else acc.global_sum + g
                self._collect_local(acc, output.attention[b], output.descriptors[b], scale, crop)
        return [self._finish(acc) for acc in accumulators]

    def _capped(self, crop: PreparedImage) -> torch.Tensor:
        """(3, h, w) uint8 capped crop → (3, h, w) float32 on the device."""
        # a copy: arrays from Ray's object store are read-only, which torch.from_numpy warns about
        return torch.tensor(crop.pixels).to(self.device, non_blocking=True).float()

    def _run_scale(self, batch: torch.Tensor, scale: float, with_global: bool) -> LocalAndGlobal:
        """(B, 3, h, w) capped images → model outputs at ``scale``, in forward passes of at most
        ``max_batch_pixels`` input pixels (at least one image each)."""
        height, width = scaled_size(*batch.shape[-2:], scale)
        budget = self.runtime.max_batch_pixels
        step = max(1, budget // (height * width)) if budget else len(batch)
        parts = [
            self._forward_scaled(batch[i : i + step], (height, width), with_global)
            for i in range(0, len(batch), step)
        ]
        if len(parts) == 1:
            return parts[0]
        return LocalAndGlobal(
            attention=torch.cat([p.attention for p in parts]),
            descriptors=torch.cat([p.descriptors for p in parts]),
            global_descriptor=torch.cat([p.global_descriptor for p in parts]) if with_global else None,
        )

    def _forward_scaled(
        self, batch: torch.Tensor, size: tuple[int, int], with_global: bool
    ) -> LocalAndGlobal:
        x = (resize(batch, size) - self._mean) / self._std
        if self.runtime.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self._forward(x, with_global)

    def _collect_local(
        self,
        acc: _Accumulator,
        attention: torch.Tensor,
        descriptors: torch.Tensor,
        scale: float,
        crop: PreparedImage,
    ) -> None:
        """Keep this scale's candidates: attention ≥ threshold, then its own top-K (the final top-K over
        all scales can only pick among these). attention (h, w), descriptors (d, h, w)."""
        width = attention.shape[1]
        scores = attention.float().flatten()  # (h·w,)
        keep = torch.nonzero(scores >= self.config.attention_threshold).squeeze(1)
        if keep.numel() > self.config.max_local_features:
            keep = keep[torch.topk(scores[keep], self.config.max_local_features).indices]
        rows, cols = (keep // width).cpu().numpy(), (keep % width).cpu().numpy()
        acc.scores.append(scores[keep].cpu().numpy())
        acc.descriptors.append(descriptors.flatten(1)[:, keep].T.float().cpu().numpy())  # (n, d)
        acc.keypoints.append(self._keypoints(rows, cols, scale, crop))
        acc.scales.append(np.full(len(keep), scale, dtype=np.float32))

    def _keypoints(self, rows: np.ndarray, cols: np.ndarray, scale: float, crop: PreparedImage) -> np.ndarray:
        """Receptive-field centres (n, 2) (x, y) of feature rows/cols at ``scale``, in original pixels."""
        crop_h, crop_w = crop.crop_size
        capped_h, capped_w = crop.capped_size
        x = _to_original(cols, self.keypoint_field, scale, capped_w, crop_w, crop.origin[0])
        y = _to_original(rows, self.keypoint_field, scale, capped_h, crop_h, crop.origin[1])
        return np.stack([x, y], axis=1)

    def _finish(self, acc: _Accumulator) -> ImageFeatures:
        assert acc.global_sum is not None  # global_scales ⊆ scales is validated by the config
        scores = np.concatenate(acc.scores)
        order = np.argsort(-scores, kind="stable")[: self.config.max_local_features]
        return ImageFeatures(
            global_descriptor=F.normalize(acc.global_sum.float(), dim=-1).cpu().numpy().astype(np.float32),
            keypoints=np.concatenate(acc.keypoints)[order].astype(np.float32),
            scales=np.concatenate(acc.scales)[order],
            scores=scores[order].astype(np.float32),
            descriptors=np.concatenate(acc.descriptors)[order].astype(np.float32),
        )


def _check_model_matches(model: Delg, config: ExtractionConfig) -> None:
    found = {
        "backbone": model.backbone.spec.name,
        "local_dim": model.local_dim,
        "local_head": model.local_head,
        "whitening": model.whitening is not None,
        "global_dim": model.global_dim,
        "gem_p": model.gem_p,
        "global_pool": model.global_pool,
    }
    wrong = {k: v for k, v in found.items() if getattr(config, k) != v}
    if wrong:
        raise ValueError(
            f"model does not match the config: model has {wrong}, config has "
            f"{ {k: getattr(config, k) for k in wrong} }"
        )


def build_extractor(
    config: ExtractionConfig | str,
    weights_url: str | None = None,
    options: storage.Options = None,
    device: str | torch.device | None = None,
    runtime: RuntimeOptions | None = None,
) -> Extractor:
    """Eval-mode extractor for ``config`` (or a preset name). ``weights_url``: a full DELG state dict, a
    torchvision-named backbone-only state dict (e.g. the shared ImageNet MobileNetV2 features), or
    ``"imagenet"`` (torchvision download); None: random init (tests and demos only; logged)."""
    if isinstance(config, str):
        config = get_preset(config)
    model = Delg.from_config(config)
    if weights_url is None:
        log.warning("no weights given for %s: random init (only meaningful for tests)", config.backbone)
        weights_id = "random"
    else:
        weights_id = load_pretrained(model, weights_url, options)
    return Extractor(model, config, runtime=runtime, device=device, weights_id=weights_id)
