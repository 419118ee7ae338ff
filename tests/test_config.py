"""ExtractionConfig / RuntimeOptions: validation, serialisation, presets."""

from __future__ import annotations

import dataclasses
import json

import pytest

from pipeline.config import PRESETS, ExtractionConfig, RuntimeOptions, get_preset, trained_preset


def test_reference_presets_carry_the_published_settings() -> None:
    r50, r101 = get_preset("delg-r50-gldv2"), get_preset("delg-r101-gldv2")
    assert r50.backbone == "resnet50-slim" and r101.backbone == "resnet101-slim"  # the released files' layout
    assert r50.gem_learned and r50.attention_input == "block3"  # learned gem/gem_power; the paper's input
    assert r50.scales == (0.25, 0.35355338, 0.5, 0.70710677, 1.0, 1.4142135, 2.0)  # as the pbtxt writes them
    assert r50.global_scales == (0.70710677, 1.0, 1.4142135)
    assert (r50.attention_threshold, r101.attention_threshold) == (454.6, 357.48)
    assert (r50.max_side, r50.max_local_features, r50.global_dim, r50.local_dim) == (1024, 1000, 2048, 128)
    assert r50.pixel_mean == (128.0,) * 3 and r50.pixel_std == (128.0,) * 3
    assert r50.gem_p == 3.0 and r50.whitening
    assert dataclasses.replace(r101, backbone="resnet50-slim", attention_threshold=454.6) == r50
    assert get_preset("delg-r50-tf2") == dataclasses.replace(r50, backbone="resnet50-ref", gem_learned=False)


def test_small_presets_use_raw_imagenet_gem() -> None:
    for name in ("delg-mobilenetv2-imagenet", "cpu-small"):
        config = get_preset(name)
        assert config.backbone == "mobilenet_v2" and not config.whitening and config.global_dim == 1280
    small = get_preset("cpu-small")
    assert small.max_side <= 256 and 2 <= len(small.scales) <= 3 and small.max_local_features <= 200
    assert small.attention_threshold == 0.0


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips_through_json(name: str) -> None:
    config = get_preset(name)
    assert ExtractionConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_names_the_preset_its_trained_weights_extract_with(name: str) -> None:
    """Training makes a learned local head, so the weights extract with the learned variant."""
    learned = get_preset(trained_preset(name))
    assert learned == dataclasses.replace(get_preset(name), local_head="learned")


def test_backbone_only_imagenet_preset_trains_into_its_learned_variant(monkeypatch) -> None:
    assert trained_preset("delg-mobilenetv2-imagenet") == "delg-mobilenetv2-imagenet-learned"
    assert trained_preset("cpu-small") == "cpu-small"  # already learned
    orphan = dataclasses.replace(get_preset("cpu-small"), local_head="backbone", max_side=300)
    monkeypatch.setitem(PRESETS, "orphan", orphan)
    with pytest.raises(ValueError, match="'orphan' has no registered variant with local_head='learned'"):
        trained_preset("orphan")


def test_runtime_options_round_trip() -> None:
    options = RuntimeOptions(
        batch_size=4, max_batch_pixels=10**6, autocast="bf16", channels_last=True, compile=True
    )
    assert RuntimeOptions.from_dict(json.loads(json.dumps(options.to_dict()))) == options


def test_unknown_keys_are_listed() -> None:
    d = get_preset("cpu-small").to_dict() | {"max_sides": 3, "zz": 1}
    with pytest.raises(ValueError, match=r"unknown ExtractionConfig keys \['max_sides', 'zz'\]"):
        ExtractionConfig.from_dict(d)
    with pytest.raises(ValueError, match=r"unknown RuntimeOptions keys \['dtype'\]"):
        RuntimeOptions.from_dict({"dtype": "bf16"})


def test_unknown_preset_lists_the_presets() -> None:
    with pytest.raises(
        ValueError, match=r"unknown preset 'delg-r52'; available: \['cpu-small', 'delg-mobilenetv2-imagenet'"
    ):
        get_preset("delg-r52")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"backbone": "vgg16"},
            r"backbone 'vgg16' is not registered; allowed: \['mobilenet_v2', 'resnet101'",
        ),
        ({"scales": ()}, "scales must not be empty"),
        ({"scales": (1.0, 0.0)}, "each scale must be > 0, got 0.0"),
        ({"scales": (1.0, -0.5), "global_scales": (1.0,)}, "each scale must be > 0, got -0.5"),
        ({"scales": (1.0, 1.0)}, "scales must be distinct"),
        ({"global_scales": (1.0, 3.0)}, r"global_scales \[3.0\] are not in scales"),
        ({"global_scales": ()}, "global_scales must not be empty"),
        ({"max_side": 0}, "max_side must be a positive int, got 0"),
        ({"max_side": 512.5}, "max_side must be a positive int, got 512.5"),
        ({"max_local_features": -1}, "max_local_features must be a positive int"),
        ({"local_dim": True}, "local_dim must be a positive int"),
        ({"gem_p": 0.0}, "gem_p must be > 0"),
        ({"attention_input": "block4"}, r"attention_input 'block4'; allowed: \['block3', 'reconstruction'\]"),
        ({"autoencoder_activation": "tanh"}, r"autoencoder_activation 'tanh'; allowed: \['none', 'relu'\]"),
        ({"attention_threshold": -1.0}, "attention_threshold must be >= 0"),
        ({"pixel_std": (1.0, 0.0, 1.0)}, "pixel_std must be > 0, got 0.0"),
        ({"pixel_mean": (1.0, 2.0)}, "need 3 values"),
        ({"whitening": False, "global_dim": 512}, r"global_dim 512 without whitening must equal .*\(2048\)"),
    ],
)
def test_bad_config_values_name_the_value_and_what_is_allowed(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(get_preset("delg-r50-gldv2"), **changes)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"batch_size": 0}, "batch_size must be a positive int, got 0"),
        ({"max_batch_pixels": -1}, r"max_batch_pixels must be an int >= 0 \(0: no cap\), got -1"),
        (
            {"autocast": "float16"},
            r"autocast 'float16' is not supported; allowed: \['none', 'bf16', 'fp16'\]",
        ),
    ],
)
def test_bad_runtime_options(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RuntimeOptions(**changes)


def test_configs_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_preset("cpu-small").max_side = 3  # type: ignore[misc]
