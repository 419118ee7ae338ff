"""Weight loading: state dicts from any fsspec URL, strictly checked; ImageNet init via torchvision; the
model settings a weights file was converted for (its sidecar ``WEIGHTS.model.json``, owned here)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
from collections.abc import Mapping

import torch
from torch import nn
from torchvision import models

from pipeline import storage
from pipeline.config import ExtractionConfig
from pipeline.errors import ConfigError, InputError, MissingInputError
from pipeline.model.delg import Delg

log = logging.getLogger(__name__)

IMAGENET = "imagenet"  # pseudo-URL: the backbone's torchvision ImageNet weights

# Head details a state dict cannot tell (the parameters are the same in every variant): what the attention
# scores, and the activation of the autoencoder's code. convert-weights records them beside the weights.
VARIANT_SETTINGS = ("attention_input", "autoencoder_activation")
MODEL_SETTINGS_SUFFIX = ".model.json"


class WeightsUnavailableError(RuntimeError):
    """Weights that exist in principle but cannot be obtained here (e.g. a download while offline)."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def weights_checksum(url: str, options: storage.Options = None) -> str:
    """sha256 of the weights file's bytes, for run metadata."""
    return sha256_hex(storage.read_bytes(url, options))


def read_state_dict(url: str, options: storage.Options = None) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict stored at ``url`` (on CPU) and the sha256 of its bytes."""
    try:
        data = storage.read_bytes(url, options)
    except FileNotFoundError:
        raise MissingInputError(f"weights file not found: {storage.redact(url)}") from None
    try:
        state_dict = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:
        raise InputError(f"{storage.redact(url)} is not a loadable torch state dict: {exc}") from exc
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()
    ):
        raise InputError(f"{storage.redact(url)} must hold a flat mapping of parameter names to tensors")
    return dict(state_dict), sha256_hex(data)


def state_dict_problems(module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Human-readable list of missing keys, unexpected keys and shape mismatches (empty: it fits)."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state_dict))
        if state_dict[k].shape != expected[k].shape
    ]
    problems = []
    for title, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", mismatched),
    ):
        if items:
            problems.append(f"{title} ({len(items)}): {', '.join(items)}")
    return problems


def load_checked(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str, strict: bool = True
) -> None:
    """Load ``state_dict`` into ``module``. Strict: ONE ValueError listing every problem. Non-strict: load
    the keys whose shapes match and log the rest."""
    problems = state_dict_problems(module, state_dict)
    if problems and strict:
        raise InputError(f"weights {what} do not fit {type(module).__name__}: " + "; ".join(problems))
    if problems:
        log.warning("loading %s non-strictly: %s", what, "; ".join(problems))
    expected = module.state_dict()
    fitting = {k: v for k, v in state_dict.items() if k in expected and v.shape == expected[k].shape}
    module.load_state_dict(fitting, strict=False)


def load_weights(model: nn.Module, url: str, options: storage.Options = None, strict: bool = True) -> str:
    """Load a full state dict of ``model`` from ``url``; returns the sha256 of the file."""
    state_dict, checksum = read_state_dict(url, options)
    load_checked(model, state_dict, storage.redact(url), strict)
    return checksum


def _without_classifier(model: Delg, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    classifier = model.backbone.spec.classifier
    if classifier is None:
        return dict(state_dict)
    return {k: v for k, v in state_dict.items() if not k.startswith(classifier + ".")}


def load_backbone_weights(model: Delg, url: str, options: storage.Options = None, strict: bool = True) -> str:
    """Load torchvision-named backbone weights (ImageNet classifier keys, if any, are ignored) into the
    backbone; the heads keep their init. ``url`` may be :data:`IMAGENET` for torchvision's download.
    Returns the file's sha256, or the torchvision weights name for ImageNet."""
    if url == IMAGENET:
        state_dict, identity = (
            _imagenet_state_dict(model),
            f"torchvision:{model.backbone.spec.imagenet_weights}",
        )
    else:
        state_dict, identity = read_state_dict(url, options)
        url = storage.redact(url)
    load_checked(model.backbone.net, _without_classifier(model, state_dict), url, strict)
    return identity


def load_pretrained(model: Delg, url: str, options: storage.Options = None) -> str:
    """Strictly load whatever ``url`` holds: a full DELG state dict (keys under ``backbone.``), a
    torchvision-named backbone-only state dict (e.g. ImageNet features; heads keep their init), or
    :data:`IMAGENET`. The file is read once. Returns its sha256 (or the torchvision weights name)."""
    if url == IMAGENET:
        checksum = load_backbone_weights(model, url)
    else:
        state_dict, checksum = read_state_dict(url, options)
        if any(key.startswith("backbone.") for key in state_dict):
            load_checked(model, state_dict, storage.redact(url))
            return checksum
        load_checked(model.backbone.net, _without_classifier(model, state_dict), storage.redact(url))
    if model.local_head == "learned":
        log.warning(
            "backbone-only weights with local_head='learned': attention and descriptors are untrained; "
            "use a preset with local_head='backbone' (e.g. delg-mobilenetv2-imagenet) for local features"
        )
    return checksum


def _imagenet_state_dict(model: Delg) -> dict[str, torch.Tensor]:
    spec = model.backbone.spec
    if spec.imagenet_weights is None:
        raise ConfigError(
            f"backbone {spec.name} has no torchvision ImageNet weights; convert the released DELG weights "
            "(landmark-index convert-weights) or pass a weights URL"
        )
    try:
        return models.get_weight(spec.imagenet_weights).get_state_dict(progress=False)
    except OSError as exc:  # URLError, connection and DNS errors are OSErrors
        raise WeightsUnavailableError(
            f"could not download ImageNet weights for {spec.name} ({spec.imagenet_weights}; offline?): {exc}. "
            "Pass a weights URL instead (backbone weights: load_backbone_weights, full DELG: load_weights)."
        ) from None


# --- the model settings recorded beside converted weights ---------------------------------------------


def model_settings_url(weights_url: str) -> str:
    return weights_url + MODEL_SETTINGS_SUFFIX


def write_model_settings(
    weights_url: str,
    config: ExtractionConfig,
    detected: bool,
    options: storage.Options = None,
    weights_sha256: str | None = None,
) -> str:
    """Record ``config``'s VARIANT_SETTINGS beside the weights at ``weights_url`` (with their sha256, so a
    replaced weights file does not inherit them; read from the file unless given); ``detected``: chosen by
    convert-weights --detect. Returns the sidecar's URL."""
    url = model_settings_url(weights_url)
    record = {
        "weights_sha256": weights_sha256 or weights_checksum(weights_url, options),
        "detected": detected,
        "settings": {name: getattr(config, name) for name in VARIANT_SETTINGS},
    }
    storage.write_text(url, json.dumps(record, indent=2, sort_keys=True) + "\n", options)
    return url


def _recorded_settings(weights_url: str, checksum: str, options: storage.Options) -> dict[str, str]:
    """The VARIANT_SETTINGS recorded beside the weights ({} without a sidecar)."""
    url = model_settings_url(weights_url)
    try:
        record = json.loads(storage.read_text(url, options))
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise InputError(f"{storage.redact(url)} is not valid JSON: {exc}") from None
    settings = record.get("settings") if isinstance(record, dict) else None
    if not isinstance(settings, dict) or set(settings) - set(VARIANT_SETTINGS):
        raise InputError(f"{storage.redact(url)} must hold settings of {list(VARIANT_SETTINGS)}")
    if record.get("weights_sha256") != checksum:
        raise InputError(
            f"{storage.redact(url)} describes other weights than {storage.redact(weights_url)} (sha256 "
            "differs): convert the weights again, or remove the stale sidecar"
        )
    return settings


def config_for_weights(
    config: ExtractionConfig, weights_url: str | None, options: storage.Options = None
) -> tuple[ExtractionConfig, str | None]:
    """``config`` as the weights at ``weights_url`` make it: the head variant recorded beside them
    (write_model_settings), and with ``gem_learned`` the GeM exponent the file holds (``gem_power``), so
    that run metadata records what extraction computes; and the sha256 of the file (None without one). The
    file is read once: on object storage it is the run's largest download before any image."""
    if weights_url is None or weights_url == IMAGENET:
        return config, None
    state_dict, checksum = read_state_dict(weights_url, options)
    settings: dict[str, object] = dict(_recorded_settings(weights_url, checksum, options))
    power = state_dict.get("gem_power")
    if config.gem_learned and power is not None and power.numel() == 1:
        settings["gem_p"] = float(power)
    try:
        return dataclasses.replace(config, **settings), checksum
    except ConfigError as exc:
        raise InputError(f"{storage.redact(model_settings_url(weights_url))}: {exc}") from None
