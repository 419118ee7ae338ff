"""DELG model: backbones, heads, receptive-field geometry and weight loading (pure torch, no Ray)."""

from __future__ import annotations

from pipeline.model.backbones import BACKBONES, Backbone, BackboneSpec, get_backbone_spec
from pipeline.model.delg import Delg, DelgOutput, LocalAndGlobal, gem
from pipeline.model.geometry import ReceptiveField, receptive_field
from pipeline.model.weights import (
    IMAGENET,
    WeightsUnavailableError,
    load_backbone_weights,
    load_pretrained,
    load_weights,
    sha256_hex,
    weights_checksum,
)

__all__ = [
    "BACKBONES",
    "IMAGENET",
    "Backbone",
    "BackboneSpec",
    "Delg",
    "DelgOutput",
    "LocalAndGlobal",
    "ReceptiveField",
    "WeightsUnavailableError",
    "gem",
    "get_backbone_spec",
    "load_backbone_weights",
    "load_pretrained",
    "load_weights",
    "receptive_field",
    "sha256_hex",
    "weights_checksum",
]
