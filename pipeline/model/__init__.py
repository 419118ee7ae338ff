"""DELG model: backbones, heads, receptive-field geometry and weight loading (pure torch, no Ray).

Names load their submodule (and torch) on first use (pipeline.lazy); pipeline.model.catalog needs no torch.
"""

from __future__ import annotations

from pipeline.lazy import lazy_exports

lazy_exports(
    __name__,
    {
        "backbones": ("BACKBONES", "Backbone", "BackboneSpec", "get_backbone_spec"),
        "delg": ("Delg", "DelgOutput", "LocalAndGlobal"),
        "geometry": ("ReceptiveField", "receptive_field"),
        "pooling": ("GLOBAL_POOLS", "NetVLAD", "gem", "mac", "rmac", "rmac_regions", "spoc"),
        "weights": (
            "IMAGENET",
            "WeightsUnavailableError",
            "load_backbone_weights",
            "load_pretrained",
            "load_weights",
            "sha256_hex",
            "weights_checksum",
        ),
    },
)
