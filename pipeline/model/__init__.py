"""DELG model: backbones, heads, receptive-field geometry and weight loading (pure torch, no Ray)."""

from __future__ import annotations

from pipeline.model.backbones import BACKBONES, Backbone, BackboneSpec, get_backbone_spec
from pipeline.model.delg import Delg, DelgOutput, LocalAndGlobal
from pipeline.model.geometry import ReceptiveField, receptive_field
from pipeline.model.pooling import GLOBAL_POOLS, NetVLAD, gem, mac, rmac, rmac_regions, spoc
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
    "GLOBAL_POOLS",
    "IMAGENET",
    "Backbone",
    "BackboneSpec",
    "Delg",
    "DelgOutput",
    "LocalAndGlobal",
    "NetVLAD",
    "ReceptiveField",
    "WeightsUnavailableError",
    "gem",
    "get_backbone_spec",
    "load_backbone_weights",
    "load_pretrained",
    "load_weights",
    "mac",
    "receptive_field",
    "rmac",
    "rmac_regions",
    "sha256_hex",
    "spoc",
    "weights_checksum",
]
