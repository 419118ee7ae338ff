"""Released DELG TF2 SavedModels → this project's state dict, and a check that both extract the same features.

The released DELG models (tensorflow/models research/delf) are SavedModels of the reference's exporter: a
module whose ``_model`` is the Keras DELG, so every variable sits in the checkpoint under ``variables/`` as
``_model/<attribute path>/<variable>/.ATTRIBUTES/VARIABLE_VALUE`` (a training checkpoint names the model
``model`` and adds optimizer slots, counters and the classifiers). ``LAYOUT`` says how each Keras variable
becomes a PyTorch tensor, ``layer_table`` which Keras layer feeds which PyTorch module; every variable is
mapped or matched by ``IGNORED``, anything else is an error that lists the names.

TensorFlow (the optional extra ``convert``) is imported here only, inside the functions that read
SavedModels; nothing else in the package imports it.
"""

from __future__ import annotations

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
from pipeline.config import ExtractionConfig
from pipeline.extract import ImageFeatures, build_extractor
from pipeline.model.delg import Delg
from pipeline.model.weights import load_checked, sha256_hex

log = logging.getLogger(__name__)

VALUE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
MODEL_ROOTS = ("_model", "model")  # the exporter's attribute / the training checkpoint's


def _same(value: np.ndarray) -> np.ndarray:
    return value


def _hwio_to_oihw(kernel: np.ndarray) -> np.ndarray:
    return kernel.transpose(3, 2, 0, 1)  # TF conv kernel (h, w, in, out) → PyTorch (out, in, h, w)


def _dense_to_linear(kernel: np.ndarray) -> np.ndarray:
    return kernel.T  # TF Dense kernel (in, out) → PyTorch Linear weight (out, in)


Rule = tuple[str, Callable[[np.ndarray], np.ndarray]]  # PyTorch parameter name, layout change

# Keras variable name → PyTorch parameter name and layout change, per kind of layer.
LAYOUT: dict[type, dict[str, Rule]] = {
    nn.Conv2d: {"kernel": ("weight", _hwio_to_oihw), "bias": ("bias", _same)},
    nn.BatchNorm2d: {
        "gamma": ("weight", _same),
        "beta": ("bias", _same),
        "moving_mean": ("running_mean", _same),
        "moving_variance": ("running_var", _same),
    },
    nn.Linear: {"kernel": ("weight", _dense_to_linear), "bias": ("bias", _same)},
}

# Keras layer path (under the model) → PyTorch module path, for the heads. The backbone's modules carry the
# reference's attribute names, so backbone/<a>/<b> is backbone.net.<a>.<b> (see layer_table).
HEAD_LAYERS = {
    "backbone/embedding_layer": "whitening",  # the FC "whitening" after GeM
    "attention/conv1": "attention.conv1",
    "attention/bn_conv1": "attention.bn",
    "attention/conv2": "attention.conv2",
    "autoencoder/conv1": "autoencoder.encoder",  # 1024 → 128: the local descriptor
    "autoencoder/conv2": "autoencoder.decoder",  # 128 → 1024 + ReLU: the reconstruction
}

# Checkpoint entries that are not part of the extraction model.
IGNORED = re.compile(
    r"_CHECKPOINTABLE_OBJECT_GRAPH"  # the checkpoint's own object graph
    r"|\.OPTIMIZER_SLOT/"  # optimizer slots (momentum) of any variable
    r"|^optimizer/"  # optimizer state: iterations, learning rate
    r"|^(save_counter|global_step|step)/"  # counters
    r"|^[^/]+/(desc_classification|attn_classification|cosine_weights|scale_factor)(/|$)"  # classifiers, ArcFace
)


def layer_table(model: Delg) -> dict[str, tuple[str, nn.Module]]:
    """Keras layer path → (PyTorch module path, module) for every layer with weights of ``model``."""
    table = {}
    for name, module in model.backbone.net.named_modules():
        if type(module) in LAYOUT or isinstance(module, nn.Conv2d):
            table["backbone/" + name.replace(".", "/")] = (f"backbone.net.{name}", module)
    for tf_path, torch_path in HEAD_LAYERS.items():
        if torch_path == "whitening" and model.whitening is None:
            continue
        table[tf_path] = (torch_path, model.get_submodule(torch_path))
    return table


def _kind(module: nn.Module) -> type:
    return nn.Conv2d if isinstance(module, nn.Conv2d) else type(module)


def tf_to_state_dict(
    variables: Mapping[str, np.ndarray], model: Delg
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Checkpoint entries (name → array) → (a full state dict of ``model``, the ignored names).

    Raises ValueError listing every entry that is neither mapped nor ignored, and every parameter of the
    model that no entry fills or whose shape differs."""
    table = layer_table(model)
    state_dict: dict[str, torch.Tensor] = {}
    ignored, unknown = [], []
    for name in sorted(variables):
        if IGNORED.search(name):
            ignored.append(name)
            continue
        target = _target(name, table)
        if target is None:
            unknown.append(name)
            continue
        torch_name, change = target
        state_dict[torch_name] = torch.from_numpy(np.ascontiguousarray(change(np.asarray(variables[name]))))
    if unknown:
        raise ValueError(
            f"{len(unknown)} checkpoint variables are neither mapped nor ignored (wrong preset or not a DELG "
            f"SavedModel?): {', '.join(unknown)}"
        )
    for key, value in model.state_dict().items():  # PyTorch-only BatchNorm counters, unused in eval
        if key.endswith("num_batches_tracked"):
            state_dict[key] = value.clone()
    load_checked(model, state_dict, "converted from the TF checkpoint")  # strict: one error lists all
    return state_dict, ignored


def _target(name: str, table: Mapping[str, tuple[str, nn.Module]]) -> Rule | None:
    """(PyTorch parameter name, layout change) of one checkpoint entry, None when it maps to nothing."""
    if not name.endswith(VALUE_SUFFIX):
        return None
    root, _, path = name[: -len(VALUE_SUFFIX)].partition("/")
    layer, _, variable = path.rpartition("/")
    if root not in MODEL_ROOTS or layer not in table:
        return None
    torch_path, module = table[layer]
    rule = LAYOUT[_kind(module)].get(variable)
    return None if rule is None else (f"{torch_path}.{rule[0]}", rule[1])


# --- TensorFlow side -----------------------------------------------------------------------------------


def _tensorflow():
    try:
        import tensorflow as tf
    except ImportError:
        raise ValueError(
            "reading TF SavedModels needs TensorFlow: pip install 'landmark-index[convert]' (tensorflow-cpu)"
        ) from None
    return tf


def checkpoint_prefix(src: str) -> str:
    """The checkpoint prefix of a SavedModel directory, its variables/ directory, or a prefix itself."""
    path = Path(src)
    for prefix in (path / "variables" / "variables", path / "variables", path):
        if Path(f"{prefix}.index").exists():
            return str(prefix)
    raise FileNotFoundError(
        f"{src} is not a TF2 SavedModel directory (with variables/variables.index), its variables/ "
        "directory, or a checkpoint prefix"
    )


def read_checkpoint(src: str) -> dict[str, np.ndarray]:
    """Every entry of the checkpoint behind ``src`` (see checkpoint_prefix), ignored ones as names only."""
    reader = _tensorflow().train.load_checkpoint(checkpoint_prefix(src))
    names = reader.get_variable_to_shape_map()
    return {name: np.zeros(0) if IGNORED.search(name) else reader.get_tensor(name) for name in names}


@dataclass(frozen=True)
class Conversion:
    out: str
    sha256: str
    tensors: int  # PyTorch tensors written
    ignored: list[str]  # checkpoint entries left out on purpose


def convert_weights(
    src: str, out: str, config: ExtractionConfig, options: storage.Options = None
) -> Conversion:
    """Convert the released DELG SavedModel (or checkpoint) at ``src`` into a state dict for ``config``'s
    model, written to ``out`` (any storage URL)."""
    state_dict, ignored = tf_to_state_dict(read_checkpoint(src), Delg.from_config(config))
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    data = buffer.getvalue()
    storage.write_bytes(out, data, options)
    return Conversion(storage.redact(out), sha256_hex(data), len(state_dict), ignored)


def reference_features(saved_model: str, image: np.ndarray, config: ExtractionConfig) -> ImageFeatures:
    """Features of ``image`` ((H, W, 3) uint8 RGB) by the SavedModel's own serving function, fed and
    post-processed as the reference's extractor does (PIL cap, per-scale L2 → sum → L2 global, L2 local
    descriptors, box centres divided by the capping factors)."""
    if not (Path(saved_model) / "saved_model.pb").exists():
        raise FileNotFoundError(f"{saved_model} is not a SavedModel directory (no saved_model.pb)")
    tf = _tensorflow()
    serve = tf.saved_model.load(saved_model).signatures["serving_default"]
    capped, factors = _reference_cap(image, config.max_side)
    out = serve(
        input_image=tf.constant(capped),
        input_scales=tf.constant(config.scales, dtype=tf.float32),
        input_max_feature_num=tf.constant(config.max_local_features, dtype=tf.int32),
        input_abs_thres=tf.constant(config.attention_threshold, dtype=tf.float32),
        input_global_scales_ind=tf.constant([config.scales.index(s) for s in config.global_scales], tf.int32),
    )
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


def verify_conversion(
    saved_model: str, weights: str, image_url: str, config: ExtractionConfig, options: storage.Options = None
) -> Comparison:
    """Run the SavedModel's serving function and the converted PyTorch extractor (``weights``) on the same
    image with ``config``'s settings, and compare what they extract."""
    with Image.open(io.BytesIO(storage.read_bytes(image_url, options))) as image:
        pixels = np.asarray(image.convert("RGB"))  # as the reference's RgbLoader: no EXIF rotation
    reference = reference_features(saved_model, pixels, config)
    extractor = build_extractor(config, weights, options, device="cpu")
    converted = extractor.extract_single(torch.from_numpy(pixels.copy()).permute(2, 0, 1))
    return compare_features(reference, converted)
