"""Released DELG models (TF1 SavedModels) and TF2 reference checkpoints → this project's state dict, and a
check that both extract the same features.

Three checkpoint layouts convert, the layout chosen from the file's own variables:
- TF1 name-based (the released r50/r101delg files): tf-slim names, ``resnet_v1_50/block1/unit_1/
  bottleneck_v1/conv1/weights`` and ``.../BatchNorm/gamma``, heads ``attonly/attention/compute/conv1``,
  ``dim_reduction/conv1``, ``dim_expand/conv1``, ``gem/gem_power``, ``embed``;
- TF2 object-based (the TF2 reference's SavedModel exporter, its ``train.py`` checkpoints, the Keras
  ``delf_weights`` the exporter reads): keys name an object-graph path that may run through a layer's
  ``variables`` list (``_model/attention/variables/0/.ATTRIBUTES/VARIABLE_VALUE``), so each key is resolved
  through the checkpoint's TrackableObjectGraph to the attribute path of the same variable
  (``_model/attention/conv1/kernel``). The model sits under ``_model`` (exporter), ``model`` (training
  checkpoint) or at the root (``delf_weights``).
``layer_table`` says which TF scope feeds which PyTorch module, ``LAYOUT`` how each TF variable becomes a
PyTorch tensor; every variable is mapped or matched by ``IGNORED``, anything else is an error naming it.

TensorFlow (the optional extra ``convert``) is imported here only, inside the functions that read
checkpoints and SavedModels; nothing else in the package imports it.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from pipeline import storage
from pipeline.config import ATTENTION_INPUTS, AUTOENCODER_ACTIVATIONS, PRESETS, ExtractionConfig
from pipeline.errors import ConfigError, InputError, MissingInputError
from pipeline.features import ImageFeatures, build_extractor
from pipeline.model.backbones import BACKBONES
from pipeline.model.delg import Delg
from pipeline.model.resnet_slim import ConvBN, SlimResNet
from pipeline.model.weights import load_checked, sha256_hex

log = logging.getLogger(__name__)

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
        raise InputError(
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
        raise InputError(
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
        raise InputError(
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


# --- TensorFlow side -----------------------------------------------------------------------------------


def _tensorflow():
    try:
        import tensorflow as tf
    except ImportError:
        raise ConfigError(
            "reading TF SavedModels needs TensorFlow: pip install 'landmark-index[convert]' (tensorflow-cpu)"
        ) from None
    return tf


def checkpoint_prefix(src: str) -> str:
    """The checkpoint prefix of a SavedModel directory, its variables/ directory, or a prefix itself."""
    path = Path(src)
    for prefix in (path / "variables" / "variables", path / "variables", path):
        if Path(f"{prefix}.index").exists():
            return str(prefix)
    raise MissingInputError(
        f"{src} is not a SavedModel directory (with variables/variables.index), its variables/ directory, "
        "or a checkpoint prefix"
    )


def object_paths(graph: bytes) -> dict[str, str]:
    """Checkpoint key → attribute path of its variable, from a TF2 checkpoint's TrackableObjectGraph.

    A variable is reachable on several paths (Keras tracks a layer's weights by attribute and again in its
    ``variables`` list); the key is written on whichever TF met first. The attribute path is the one that
    avoids list indices: a breadth-first walk over named edges, list items only for what it cannot reach."""
    from tensorflow.core.protobuf.trackable_object_graph_pb2 import TrackableObjectGraph

    nodes = TrackableObjectGraph.FromString(graph).nodes
    paths: dict[int, str] = {0: ""}
    for allow_indices in (False, True):
        queue = list(paths)
        while queue:
            parent = queue.pop(0)
            for child in nodes[parent].children:
                if child.node_id in paths or (child.local_name.isdigit() and not allow_indices):
                    continue
                paths[child.node_id] = f"{paths[parent]}/{child.local_name}".lstrip("/")
                queue.append(child.node_id)
    return {
        attribute.checkpoint_key: paths[node_id]
        for node_id, node in enumerate(nodes)
        if node_id in paths
        for attribute in node.attributes
        if attribute.name == "VARIABLE_VALUE"
    }


def read_checkpoint(src: str) -> dict[str, np.ndarray]:
    """Every entry of the checkpoint behind ``src`` (see checkpoint_prefix) by variable name: TF1 names as
    they are, TF2 keys resolved to attribute paths (object_paths); ignored entries as names only."""
    reader = _tensorflow().train.load_checkpoint(checkpoint_prefix(src))
    keys = reader.get_variable_to_shape_map()
    paths = object_paths(reader.get_tensor(OBJECT_GRAPH)) if OBJECT_GRAPH in keys else {}
    variables = {}
    for key in keys:
        name = paths.get(key, key.removesuffix(VALUE_SUFFIX))
        variables[name] = np.zeros(0) if IGNORED.search(name) else reader.get_tensor(key)
    return variables


@dataclass(frozen=True)
class Conversion:
    out: str
    sha256: str
    tensors: int  # PyTorch tensors written
    layout: str  # the file's layout, e.g. "slim ResNet-50"
    ignored: list[str]  # checkpoint entries left out on purpose
    config: ExtractionConfig  # what the weights are for: the given config, or the layout's preset


def convert_weights(
    src: str, out: str, config: ExtractionConfig | None = None, options: storage.Options = None
) -> Conversion:
    """Convert the DELG checkpoint behind ``src`` (a SavedModel, its variables/, or a checkpoint prefix)
    into a state dict for ``config``'s model (None: the preset of the file's layout), written to ``out``
    (any storage URL)."""
    variables = read_checkpoint(src)
    layout = tf_layout([name for name in variables if not IGNORED.search(name)])
    if config is None:
        preset = preset_for_layout(layout)
        if preset is None:
            raise ConfigError(f"no preset for a {_describe(layout)} DELG checkpoint; name one with --preset")
        config = PRESETS[preset]
    state_dict, ignored = tf_to_state_dict(variables, Delg.from_config(config))
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    data = buffer.getvalue()
    storage.write_bytes(out, data, options)
    return Conversion(
        storage.redact(out),
        sha256_hex(data),
        len(state_dict),
        f"{layout[0]} ResNet-{layout[1]}",
        ignored,
        config,
    )


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


# Head details a variable list cannot settle, tried by detect_variant: what the attention scores, and the
# activation of the autoencoder's code (the PyTorch model's parameters are the same in every variant).
VARIANT_SETTINGS = ("attention_input", "autoencoder_activation")


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
    the first that reproduces it (None: none does) and every variant's comparison, by variant_label."""
    pixels = _read_rgb(image_url, options)
    reference = reference_features(saved_model, pixels, config)
    found, comparisons = None, {}
    for variant in variants(config):
        comparison = compare_features(reference, _converted_features(pixels, weights, variant, options))
        comparisons[variant_label(variant)] = comparison
        if found is None and comparison.passes():
            found = variant
    return found, comparisons
