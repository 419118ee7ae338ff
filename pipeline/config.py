"""Extraction configs: WHAT is extracted (presets, recorded in run metadata) and HOW fast (runtime options).

Both are frozen dataclasses validated on construction, so a typo or an impossible value fails loudly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pipeline.errors import ConfigError
from pipeline.model.catalog import BACKBONE_CHANNELS, GLOBAL_POOLS, pooled_dim
from pipeline.rerank.config import RerankConfig, settings_of

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # torchvision ImageNet statistics in 0..255 pixel units
IMAGENET_STD = (58.395, 57.12, 57.375)
DELG_MEAN = (128.0, 128.0, 128.0)  # the TF reference normalises (x − 128) / 128
DELG_STD = (128.0, 128.0, 128.0)

# Powers of √2 around the capped image, as the reference's pbtxt writes them (float32 values: the scaled
# sizes are round(side · scale) in float32, so 0.35355 instead of 0.35355338 can change a size by a pixel).
DELG_SCALES = (0.25, 0.35355338, 0.5, 0.70710677, 1.0, 1.4142135, 2.0)
DELG_GLOBAL_SCALES = (0.70710677, 1.0, 1.4142135)  # the reference's image_scales_ind 3, 4, 5

AUTOCAST_DTYPES = ("none", "bf16", "fp16")
LOCAL_HEADS = ("learned", "backbone")
ATTENTION_INPUTS = ("block3", "reconstruction")
AUTOENCODER_ACTIVATIONS = ("none", "relu")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value!r}")


@dataclass(frozen=True)
class ExtractionConfig:
    """What DELG extraction computes. Defaults are the reference R50 GLDv2-clean extraction settings; the
    presets also pick the layout and head details their weights need."""

    backbone: str = "resnet50-ref"  # a name in pipeline.model.catalog.BACKBONE_CHANNELS
    max_side: int = 1024  # longest image side after capping (downscale only)
    scales: tuple[float, ...] = DELG_SCALES  # image pyramid, relative to the capped image
    global_scales: tuple[float, ...] = DELG_GLOBAL_SCALES  # subset of scales pooled into the global vector
    attention_threshold: float = 454.6  # absolute attention cut; tied to the trained weights
    max_local_features: int = 1000  # top-K by attention over all scales
    pixel_mean: tuple[float, float, float] = DELG_MEAN  # per RGB channel, 0..255 units
    pixel_std: tuple[float, float, float] = DELG_STD
    global_pool: str = (
        "gem"  # global pooling: gem (DELG), mac, spoc, rmac or netvlad (pipeline.model.pooling)
    )
    netvlad_clusters: int = 64  # NetVLAD centroids K (its output has K · channels dims)
    gem_p: float = 3.0  # GeM exponent (fixed; with gem_learned only its initial value)
    gem_learned: bool = False  # the exponent is a weight read from the file (the released gem/gem_power)
    whitening: bool = True  # FC layer after GeM; off = raw GeM of the backbone
    global_dim: int = 2048  # output dim of the whitening FC (= backbone channels when off)
    local_dim: int = 128  # autoencoder bottleneck = local descriptor dim
    attention_hidden: int = 512  # channels of the attention MLP's hidden 1×1 conv
    # "learned": DELG's trained attention + autoencoder. "backbone": for backbone-only weights (no trained
    # local head): attention = feature norm, descriptor = fixed orthonormal projection of the block3 feature.
    local_head: str = "learned"
    # What the learned attention scores: "block3" (the paper, the released models, the final reference) or
    # "reconstruction" (the autoencoder's output: the TF2 reference from Dec 2020 to Apr 2021).
    attention_input: str = "block3"
    autoencoder_activation: str = "none"  # on the 128-d code (the descriptor): none (reference) or relu

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONE_CHANNELS:
            raise ConfigError(
                f"backbone {self.backbone!r} is not registered; allowed: {sorted(BACKBONE_CHANNELS)}"
            )
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        object.__setattr__(self, "global_scales", tuple(float(s) for s in self.global_scales))
        object.__setattr__(self, "pixel_mean", tuple(float(v) for v in self.pixel_mean))
        object.__setattr__(self, "pixel_std", tuple(float(v) for v in self.pixel_std))
        self._validate_scales()
        self._validate_sizes()
        if self.local_head not in LOCAL_HEADS:
            raise ConfigError(f"local_head {self.local_head!r}; allowed: {list(LOCAL_HEADS)}")
        if self.attention_input not in ATTENTION_INPUTS:
            raise ConfigError(f"attention_input {self.attention_input!r}; allowed: {list(ATTENTION_INPUTS)}")
        if self.autoencoder_activation not in AUTOENCODER_ACTIVATIONS:
            raise ConfigError(
                f"autoencoder_activation {self.autoencoder_activation!r}; allowed: {list(AUTOENCODER_ACTIVATIONS)}"
            )
        if len(self.pixel_mean) != 3 or len(self.pixel_std) != 3:
            raise ConfigError(
                f"pixel_mean/pixel_std need 3 values (RGB), got {self.pixel_mean}, {self.pixel_std}"
            )
        for v in self.pixel_std:
            _check_positive("pixel_std", v)
        if self.global_pool not in GLOBAL_POOLS:
            raise ConfigError(f"global_pool {self.global_pool!r}; allowed: {list(GLOBAL_POOLS)}")
        pooled = pooled_dim(self.global_pool, BACKBONE_CHANNELS[self.backbone][1], self.netvlad_clusters)
        if not self.whitening and self.global_dim != pooled:
            raise ConfigError(
                f"global_dim {self.global_dim} without whitening must equal the {self.global_pool} output of "
                f"{self.backbone} ({pooled})"
            )

    def _validate_scales(self) -> None:
        if not self.scales:
            raise ConfigError("scales must not be empty")
        if len(set(self.scales)) != len(self.scales):
            raise ConfigError(f"scales must be distinct, got {self.scales}")
        for s in self.scales:
            _check_positive("each scale", s)
        if not self.global_scales:
            raise ConfigError("global_scales must not be empty")
        extra = sorted(set(self.global_scales) - set(self.scales))
        if extra:
            raise ConfigError(f"global_scales {extra} are not in scales {self.scales}")

    def _validate_sizes(self) -> None:
        for name in (
            "max_side",
            "global_dim",
            "local_dim",
            "attention_hidden",
            "max_local_features",
            "netvlad_clusters",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        _check_positive("gem_p", self.gem_p)
        if self.attention_threshold < 0:
            raise ConfigError(
                f"attention_threshold must be >= 0 (softplus output), got {self.attention_threshold}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExtractionConfig:
        return cls(**_known_fields(cls, d))


@dataclass(frozen=True)
class RuntimeOptions:
    """How fast extraction runs; does not change what is extracted (beyond float rounding)."""

    batch_size: int = 8  # images per forward pass (per scale)
    max_batch_pixels: int = 0  # also cap images × pixels per forward at each scale (0: no cap); on CPU
    # large batches fall out of cache (slower per image), on GPUs they bound activation memory at scale 2
    autocast: str = "none"  # CUDA mixed precision: "bf16", "fp16" or "none"
    channels_last: bool = False  # NHWC memory format (faster convs on tensor cores)
    compile: bool = False  # torch.compile the extraction forward (dynamic shapes)

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size <= 0:
            raise ConfigError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if not isinstance(self.max_batch_pixels, int) or self.max_batch_pixels < 0:
            raise ConfigError(
                f"max_batch_pixels must be an int >= 0 (0: no cap), got {self.max_batch_pixels!r}"
            )
        if self.autocast not in AUTOCAST_DTYPES:
            raise ConfigError(
                f"autocast {self.autocast!r} is not supported; allowed: {list(AUTOCAST_DTYPES)}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RuntimeOptions:
        return cls(**_known_fields(cls, d))


def _known_fields(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys {unknown}; allowed: {sorted(allowed)}")
    return dict(d)


PRESETS: dict[str, ExtractionConfig] = {
    # Released DELG R50 trained on GLDv2-clean (r50delg_gldv2clean_config.pbtxt): tf-slim resnet_v1_50 with
    # the learned GeM exponent and attention on block3, as the released TF1 files (convert-weights).
    "delg-r50-gldv2": ExtractionConfig(backbone="resnet50-slim", gem_learned=True),
    # Released DELG R101: same pipeline, its own attention threshold (r101delg_gldv2clean_config.pbtxt).
    "delg-r101-gldv2": ExtractionConfig(
        backbone="resnet101-slim", gem_learned=True, attention_threshold=357.48
    ),
    # DELG R50 as the TF2 reference code trains and exports it (training/model: Keras ResNet with
    # block3_strides, GeM p = 3, attention on block3 since Apr 2021); the R50 threshold is a placeholder.
    "delg-r50-tf2": ExtractionConfig(backbone="resnet50-ref"),
    # Quality checks with the shared ImageNet MobileNetV2 (no DELG training): ImageNet normalisation, raw
    # 1280-d GeM (an untrained whitening FC would scramble it). ImageNet objects span ~224 px, so a 512 cap
    # with scales 0.5–1.0 keeps objects near that size; upsampling (√2, 2) adds cost, not ImageNet detail.
    # The local head is untrained (local_head="backbone"): no absolute threshold, top 1000 by feature norm.
    "delg-mobilenetv2-imagenet": ExtractionConfig(
        backbone="mobilenet_v2",
        max_side=512,
        scales=(0.5, 0.70711, 1.0),
        global_scales=(0.70711, 1.0),
        attention_threshold=0.0,
        pixel_mean=IMAGENET_MEAN,
        pixel_std=IMAGENET_STD,
        whitening=False,
        global_dim=1280,
        local_head="backbone",  # ImageNet weights have no trained attention/autoencoder
    ),
    # Small and fast on CPU for tests and demos.
    "cpu-small": ExtractionConfig(
        backbone="mobilenet_v2",
        max_side=256,
        scales=(0.70711, 1.0),
        global_scales=(1.0,),
        attention_threshold=0.0,
        max_local_features=200,
        pixel_mean=IMAGENET_MEAN,
        pixel_std=IMAGENET_STD,
        whitening=False,
        global_dim=1280,
    ),
}
# What `train --preset delg-mobilenetv2-imagenet` writes (training always makes a learned local head): the
# same extraction with the trained attention and autoencoder (benchmarks/RESULTS.md, issue 13's experiment).
PRESETS["delg-mobilenetv2-imagenet-learned"] = dataclasses.replace(
    PRESETS["delg-mobilenetv2-imagenet"], local_head="learned"
)


# Re-ranking defaults by local head (every preset picks one through ``local_head``), written into each store's
# _run.json and used by rerank / run unless overridden. Trained DELG heads keep the reference's (RerankConfig
# defaults). The backbone-only head's untrained descriptors give false pairs tens of inliers, at a level that
# varies by query: a candidate moves only when its count is significant against the query's own null
# (score "gate"; settings chosen on 7 real sets, checked leave-one-dataset-out: benchmarks/RESULTS.md,
# issue 28).
RERANK_BY_LOCAL_HEAD: dict[str, dict[str, Any]] = {
    "learned": {},
    "backbone": {"score": "gate"},
}


def rerank_settings(local_head: str) -> dict[str, Any]:
    """Matching, verification and scoring settings for features of ``local_head`` (JSON-ready)."""
    if local_head not in RERANK_BY_LOCAL_HEAD:
        raise ConfigError(f"local_head {local_head!r}; allowed: {list(RERANK_BY_LOCAL_HEAD)}")
    return settings_of(RerankConfig(**RERANK_BY_LOCAL_HEAD[local_head]))


def trained_preset(name: str) -> str:
    """The preset that extracts what training preset ``name`` writes: ``name`` when its local head is
    learned, else its registered variant with local_head="learned" (training always makes one)."""
    config = get_preset(name)
    if config.local_head == "learned":
        return name
    learned = dataclasses.replace(config, local_head="learned")
    variants = [other for other, candidate in PRESETS.items() if candidate == learned]
    if not variants:
        raise ConfigError(f"preset {name!r} has no registered variant with local_head='learned'")
    return variants[0]


def preset_name(config: ExtractionConfig) -> str:
    """The name of the preset ``config`` is ("custom": none)."""
    return next((name for name, preset in PRESETS.items() if preset == config), "custom")


def get_preset(name: str) -> ExtractionConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    return PRESETS[name]
