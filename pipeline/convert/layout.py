"""How TF variables become this project's tensors: which TF scope feeds which module (:func:`layer_table`),
how each variable is transformed (:data:`LAYOUT`), and the layout a checkpoint's own names reveal."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn

from pipeline.config import PRESETS
from pipeline.errors import ConfigError, InputError
from pipeline.model.backbones import BACKBONES
from pipeline.model.delg import Delg
from pipeline.model.resnet_slim import ConvBN, SlimResNet
from pipeline.model.weights import load_checked

VALUE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
OBJECT_GRAPH = "_CHECKPOINTABLE_OBJECT_GRAPH"
MODEL_ROOTS = ("_model/", "model/")  # the exporter's attribute / the training checkpoint's


def _same(value: np.ndarray) -> np.ndarray:
    return value


def _hwio_to_oihw(kernel: np.ndarray) -> np.ndarray:
    return kernel.transpose(3, 2, 0, 1)  # TF conv kernel (h, w, in, out) → PyTorch (out, in, h, w)


def _dense_to_linear(kernel: np.ndarray) -> np.ndarray:
    return kernel.T  # TF Dense / slim fully_connected kernel (in, out) → PyTorch Linear weight (out, in)


Rule = tuple[str, Callable[[np.ndarray], np.ndarray]]  # PyTorch parameter name, layout change

# TF variable name (Keras or tf-slim) → PyTorch parameter name and layout change, per kind of layer.
LAYOUT: dict[type, dict[str, Rule]] = {
    nn.Conv2d: {
        "kernel": ("weight", _hwio_to_oihw),
        "weights": ("weight", _hwio_to_oihw),
        "bias": ("bias", _same),
        "biases": ("bias", _same),
    },
    nn.BatchNorm2d: {
        "gamma": ("weight", _same),
        "beta": ("bias", _same),
        "moving_mean": ("running_mean", _same),
        "moving_variance": ("running_var", _same),
    },
    nn.Linear: {
        "kernel": ("weight", _dense_to_linear),
        "weights": ("weight", _dense_to_linear),
        "bias": ("bias", _same),
        "biases": ("bias", _same),
    },
}

# TF scope → PyTorch module path of the heads, per layout. The Keras backbone's modules carry the
# reference's attribute names (backbone/<a>/<b> is backbone.net.<a>.<b>), the slim one its scopes.
KERAS_HEADS = {
    "backbone/embedding_layer": "whitening",  # the FC "whitening" after GeM
    "attention/conv1": "attention.conv1",
    "attention/bn_conv1": "attention.bn",
    "attention/conv2": "attention.conv2",
    "autoencoder/conv1": "autoencoder.encoder",  # 1024 → 128: the local descriptor
    "autoencoder/conv2": "autoencoder.decoder",  # 128 → 1024 + ReLU: the reconstruction
}
SLIM_HEADS = {
    "embed": "whitening",
    "attonly/attention/compute/conv1": "attention.conv1",
    "attonly/attention/compute/conv1/BatchNorm": "attention.bn",
    "attonly/attention/compute/conv2": "attention.conv2",
    "dim_reduction/conv1": "autoencoder.encoder",
    "dim_reduction/conv1/BatchNorm": "autoencoder.encoder_bn",
    "dim_expand/conv1": "autoencoder.decoder",
    "dim_expand/conv1/BatchNorm": "autoencoder.decoder_bn",
}
SLIM_SCALARS = {"gem/gem_power": "gem_power"}  # the learned GeM exponent, a scalar parameter

# Checkpoint entries that are not part of the extraction model.
IGNORED = re.compile(
    r"^_CHECKPOINTABLE_OBJECT_GRAPH$"  # the checkpoint's own object graph
    r"|\.OPTIMIZER_SLOT/"  # optimizer slots (momentum) of any variable
    r"|/(Momentum|ExponentialMovingAverage)$"  # TF1 optimizer slots and averages
    r"|^optimizer/"  # optimizer state: iterations, learning rate
    r"|^(save_counter|global_step|step)(/|$)"  # counters
    r"|^(_model/|model/)?(desc_classification|attn_classification|cosine_weights|scale_factor)(/|$)"
    r"|^attonly/attention/logits/"  # TF1 attention classifier
)


def layer_table(model: Delg) -> dict[str, tuple[str, nn.Module]]:
    """TF scope → (PyTorch module path, module) for every layer with weights of ``model``."""
    spec = model.backbone.spec
    if spec.tf_layout is None:
        raise ConfigError(
            f"backbone {spec.name} has no TF layout to convert from; use a -slim or -ref backbone"
        )
    table = {}
    if spec.tf_layout[0] == "slim":
        net: SlimResNet = model.backbone.net
        for name, module in net.named_modules():
            if isinstance(module, ConvBN):
                scope = net.checkpoint_scope(name)
                table[scope] = (f"backbone.net.{name}.conv", module.conv)
                table[f"{scope}/BatchNorm"] = (f"backbone.net.{name}.bn", module.bn)
        heads = SLIM_HEADS
    else:
        for name, module in model.backbone.net.named_modules():
            if type(module) in LAYOUT or isinstance(module, nn.Conv2d):
                table["backbone/" + name.replace(".", "/")] = (f"backbone.net.{name}", module)
        heads = KERAS_HEADS
    for scope, torch_path in heads.items():
        if torch_path == "whitening" and model.whitening is None:
            continue
        table[scope] = (torch_path, model.get_submodule(torch_path))
    return table


def _kind(module: nn.Module) -> type:
    return nn.Conv2d if isinstance(module, nn.Conv2d) else type(module)


def tf_layout(names: list[str]) -> tuple[str, int]:
    """The layout of a checkpoint's (resolved) variable names: ("slim" | "keras", ResNet depth)."""
    slim = {m.group(1) for name in names if (m := re.match(r"resnet_v1_(\d+)/", name))}
    if slim:
        if len(slim) > 1:
            raise InputError(f"checkpoint mixes tf-slim ResNets: {sorted(slim)}")
        return "slim", int(slim.pop())
    stage4 = {m.group(1) for name in names if (m := re.search(r"(?:^|/)backbone/l4([a-z])/", name))}
    if not stage4:
        raise ConfigError(
            "not a DELG checkpoint: neither tf-slim resnet_v1 variables (resnet_v1_50/...) nor the TF2 "
            "reference's Keras ResNet (backbone/l4a/...) found"
        )
    return "keras", 3 * (3 + 4 + len(stage4) + 3) + 2


def preset_for_layout(layout: tuple[str, int]) -> str | None:
    """The first preset whose backbone has ``layout`` (e.g. delg-r50-gldv2 for ("slim", 50)), None if none."""
    return next((name for name, c in PRESETS.items() if BACKBONES[c.backbone].tf_layout == layout), None)


def _describe(layout: tuple[str, int]) -> str:
    return f"{layout[0]} ResNet-{layout[1]}"


def tf_to_state_dict(
    variables: Mapping[str, np.ndarray], model: Delg
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Checkpoint entries (resolved name → array) → (a full state dict of ``model``, the ignored names).

    Raises ValueError naming the file's layout when it is not the model's, listing every entry that is
    neither mapped nor ignored, and every parameter of the model that no entry fills or whose shape differs."""
    layout = tf_layout([name for name in variables if not IGNORED.search(name)])
    expected = model.backbone.spec.tf_layout
    if layout != expected:
        preset = preset_for_layout(layout)
        raise ConfigError(
            f"the checkpoint is a {_describe(layout)} DELG, the model's backbone {model.backbone.spec.name} a "
            f"{_describe(expected) if expected else 'non-TF layout'}"
            + (f": use --preset {preset}" if preset else "")
        )
    table = layer_table(model)
    state_dict: dict[str, torch.Tensor] = {}
    ignored, unknown = [], []
    for name in sorted(variables):
        if IGNORED.search(name):
            ignored.append(name)
            continue
        target = _target(name, table, model)
        if target is None:
            unknown.append(name)
            continue
        torch_name, change = target
        state_dict[torch_name] = torch.from_numpy(np.array(change(np.asarray(variables[name])), order="C"))
    if unknown:
        raise ConfigError(
            f"{len(unknown)} checkpoint variables are neither mapped nor ignored (wrong preset or not a DELG "
            f"checkpoint?): {', '.join(unknown)}"
        )
    for key, value in model.state_dict().items():  # PyTorch-only BatchNorm counters, unused in eval
        if key.endswith("num_batches_tracked"):
            state_dict[key] = value.clone()
    load_checked(model, state_dict, "converted from the TF checkpoint")  # strict: one error lists all
    return state_dict, ignored


def _target(name: str, table: Mapping[str, tuple[str, nn.Module]], model: Delg) -> Rule | None:
    """(PyTorch parameter name, layout change) of one checkpoint entry, None when it maps to nothing."""
    if name in SLIM_SCALARS and model.gem_power is not None:
        return SLIM_SCALARS[name], _same
    path = next((name[len(root) :] for root in MODEL_ROOTS if name.startswith(root)), name)
    layer, _, variable = path.rpartition("/")
    if layer not in table:
        return None
    torch_path, module = table[layer]
    rule = LAYOUT[_kind(module)].get(variable)
    return None if rule is None else (f"{torch_path}.{rule[0]}", rule[1])
