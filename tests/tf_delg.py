"""DELG SavedModels built the two ways the real ones were, at seeded random weights (tests only).

Written from reading tensorflow/models research/delf (delf_v1.py, training/model/resnet50.py, delg_model.py,
export_local_and_global_model.py, export_model_utils.py, examples/extractor.py) and tf-slim's
nets/resnet_v1.py / resnet_utils.py:
- ``export_slim_delg``: a TF1 graph (tf.compat.v1) whose variables carry exactly the released files' names
  and shapes (read from the shared list), saved as a TF1 SavedModel with the end-points the reference's
  extractor prunes to (input_image:0 … global_descriptors:0);
- ``export_keras_delg``: the TF2 reference's Keras DELG (tf_keras: Keras 2, as the reference needs) under
  ``_model`` of a tf.Module with the exporter's serving signature, plus ``delf_weights``-style checkpoints.
Both share the exporter's multi-scale loop (``extract_multiscale``).
"""

from __future__ import annotations

import string
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tensorflow as tf
import tf_keras

RF, STRIDE, PADDING = 291.0, 32.0, 145.0  # the reference's receptive box of block3

ModelFn = Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor, tf.Tensor]]


def extract_multiscale(
    model_fn: ModelFn,
    image: tf.Tensor,
    scales: tf.Tensor,
    abs_thres: tf.Tensor,
    max_feature_num: tf.Tensor,
    global_scales_ind: tf.Tensor,
    depth: int,
    global_dim: int,
) -> dict[str, tf.Tensor]:
    """The exporter's extraction: per scale, resize (bilinear), run the model, keep locations with attention
    ≥ abs_thres with their receptive boxes; global prelogits of the chosen scales; then the top
    max_feature_num by attention (NMS at IoU 1.0 sorts without suppressing).
    ``model_fn``: (1, H, W, 3) normalised image → global (1, D), attention (1, h, w, 1), features
    (1, h, w, depth)."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    normalised = ((tf.cast(image, tf.float32) - 128.0) / 128.0)[None]

    def body(i, boxes, features, feature_scales, scores, globals_):
        scale = scales[i]
        resized = tf.image.resize(normalised, tf.cast(tf.round(shape * scale), tf.int32))
        global_feature, prob, feature_map = model_fn(resized)
        height, width = tf.shape(feature_map)[1], tf.shape(feature_map)[2]
        x, y = tf.meshgrid(tf.range(width), tf.range(height))
        points = tf.cast(tf.reshape(tf.stack([y, x], axis=2), [-1, 2]), tf.float32)
        offsets = tf.constant([-PADDING, -PADDING, RF - 1 - PADDING, RF - 1 - PADDING])
        rf_boxes = (STRIDE * tf.concat([points, points], 1) + offsets) / scale
        prob = tf.reshape(prob, [-1])
        keep = tf.reshape(tf.where(prob >= abs_thres), [-1])
        kept = tf.gather(prob, keep)
        chosen = tf.reduce_any(tf.equal(global_scales_ind, i))
        return (
            i + 1,
            tf.concat([boxes, tf.gather(rf_boxes, keep)], 0),
            tf.concat([features, tf.gather(tf.reshape(feature_map, [-1, depth]), keep)], 0),
            tf.concat([feature_scales, tf.ones_like(kept) / scale], 0),
            tf.concat([scores, kept], 0),
            tf.cond(chosen, lambda: tf.concat([globals_, global_feature], 0), lambda: globals_),
        )

    start = (
        tf.constant(0),
        tf.zeros([0, 4]),
        tf.zeros([0, depth]),
        tf.zeros([0]),
        tf.zeros([0]),
        tf.zeros([0, global_dim]),
    )
    invariants = (
        tf.TensorShape([]),
        tf.TensorShape([None, 4]),
        tf.TensorShape([None, depth]),
        tf.TensorShape([None]),
        tf.TensorShape([None]),
        tf.TensorShape([None, global_dim]),
    )
    _, boxes, features, feature_scales, scores, globals_ = tf.while_loop(
        lambda i, *_: i < tf.shape(scales)[0], body, start, shape_invariants=invariants
    )
    count = tf.minimum(max_feature_num, tf.shape(boxes)[0])
    selected = tf.image.non_max_suppression(boxes, scores, count, iou_threshold=1.0)
    return {
        "boxes": tf.gather(boxes, selected),
        "features": tf.gather(features, selected),
        "scales": tf.gather(feature_scales, selected),
        "scores": tf.expand_dims(tf.gather(scores, selected), 1),
        "global_descriptors": globals_,
    }


# --- TF1: tf-slim names, as the released files -------------------------------------------------------


def read_variable_list(path: str | Path) -> dict[str, tuple[int, ...]]:
    """name → shape from a ``name<TAB>[d0, d1, ...]`` list (# comments)."""
    variables = {}
    for line in Path(path).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, shape = line.split("\t")
            variables[name] = tuple(int(d) for d in shape.strip("[]").split(",") if d.strip())
    return variables


def _random_value(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """He-initialised kernels, BatchNorm parameters that keep activations in range, a GeM power near 3."""
    leaf = name.rsplit("/", 1)[-1]
    if leaf == "gem_power":
        return np.float32(3.0 + rng.uniform(-0.3, 0.3))
    if leaf == "weights":
        fan_in = int(np.prod(shape[:-1]))
        return rng.normal(0, np.sqrt(2.0 / fan_in), shape).astype(np.float32)
    values = {
        "gamma": lambda: rng.uniform(0.5, 1.0, shape),
        "beta": lambda: rng.normal(0, 0.1, shape),
        "moving_mean": lambda: rng.normal(0, 0.1, shape),
        "moving_variance": lambda: rng.uniform(0.5, 2.0, shape),
        "biases": lambda: rng.normal(0, 0.05, shape),
    }
    return values[leaf]().astype(np.float32)


class SlimDelg:
    """The released graph's computation on a dict of its variables (name → tensor): tf-slim resnet_v1 with
    BatchNorm ε 1e-5, attention on block3 (or the reconstruction), autoencoder with BatchNorm."""

    def __init__(self, weights: dict[str, tf.Tensor], attention_input: str, activation: str) -> None:
        self.w = weights
        self.scope = next(name.split("/")[0] for name in weights if name.startswith("resnet_v1_"))
        self.attention_input, self.activation = attention_input, activation

    def conv_bn(self, x, scope: str, stride: int = 1, relu: bool = True) -> tf.Tensor:
        kernel = self.w[f"{scope}/weights"]
        size = kernel.shape[0]
        if stride > 1:  # conv2d_same: symmetric explicit padding, then VALID
            pad = [(size - 1) // 2, size - 1 - (size - 1) // 2]
            x = tf.pad(x, [[0, 0], pad, pad, [0, 0]])
        x = tf.nn.conv2d(x, kernel, stride, "VALID" if stride > 1 else "SAME")
        bn = f"{scope}/BatchNorm"
        x = tf.nn.batch_normalization(
            x, self.w[f"{bn}/moving_mean"], self.w[f"{bn}/moving_variance"], self.w[f"{bn}/beta"],
            self.w[f"{bn}/gamma"], 1e-5,
        )  # fmt: skip
        return tf.nn.relu(x) if relu else x

    def unit(self, x, scope: str, stride: int) -> tf.Tensor:
        scope = f"{scope}/bottleneck_v1"
        if f"{scope}/shortcut/weights" in self.w:
            shortcut = self.conv_bn(x, f"{scope}/shortcut", stride, relu=False)
        else:
            shortcut = tf.nn.max_pool2d(x, 1, stride, "SAME") if stride > 1 else x
        y = self.conv_bn(x, f"{scope}/conv1")
        y = self.conv_bn(y, f"{scope}/conv2", stride)
        y = self.conv_bn(y, f"{scope}/conv3", relu=False)
        return tf.nn.relu(shortcut + y)

    def block(self, x, index: int, stride: int) -> tf.Tensor:
        count = sum(
            1 for n in self.w if n.startswith(f"{self.scope}/block{index}/") and n.endswith("conv1/weights")
        )
        for u in range(1, count + 1):
            x = self.unit(x, f"{self.scope}/block{index}/unit_{u}", stride if u == count else 1)
        return x

    def __call__(self, images: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        x = self.conv_bn(images, f"{self.scope}/conv1", stride=2)
        x = tf.nn.max_pool2d(x, 3, 2, "SAME")
        for index in (1, 2, 3):
            x = self.block(x, index, 2)
        block3 = x
        block4 = self.block(block3, 4, 1)
        p = self.w["gem/gem_power"]
        gem = tf.pow(tf.reduce_mean(tf.pow(tf.maximum(block4, 1e-6), p), axis=[1, 2]), 1.0 / p)
        global_feature = tf.matmul(gem, self.w["embed/weights"]) + self.w["embed/biases"]
        reduced = self.conv_bn(block3, "dim_reduction/conv1", relu=self.activation == "relu")
        expanded = self.conv_bn(reduced, "dim_expand/conv1")
        attended = expanded if self.attention_input == "reconstruction" else block3
        hidden = self.conv_bn(attended, "attonly/attention/compute/conv1")
        score = tf.nn.conv2d(hidden, self.w["attonly/attention/compute/conv2/weights"], 1, "SAME")
        prob = tf.nn.softplus(score + self.w["attonly/attention/compute/conv2/biases"])
        return global_feature, prob, reduced


def export_slim_delg(
    path: str, variables: dict[str, tuple[int, ...]], seed: int = 0, attention_input: str = "block3",
    activation: str = "none",
) -> None:  # fmt: skip
    """A TF1 SavedModel at ``path`` with exactly ``variables`` (name → shape) at seeded random values, and
    the released files' end-points; ``attention_input`` / ``activation`` choose the head variant."""
    rng = np.random.default_rng(seed)
    graph = tf.Graph()
    with graph.as_default():
        weights = {
            name: tf.compat.v1.get_variable(
                name, initializer=_random_value(rng, name, shape), use_resource=True
            )
            for name, shape in variables.items()
        }
        feeds = {
            "input_image": tf.compat.v1.placeholder(tf.uint8, [None, None, 3], "input_image"),
            "input_scales": tf.compat.v1.placeholder(tf.float32, [None], "input_scales"),
            "input_abs_thres": tf.compat.v1.placeholder(tf.float32, [], "input_abs_thres"),
            "input_max_feature_num": tf.compat.v1.placeholder(tf.int32, [], "input_max_feature_num"),
            "input_global_scales_ind": tf.compat.v1.placeholder(tf.int32, [None], "input_global_scales_ind"),
        }
        model = SlimDelg(weights, attention_input, activation)
        depth = variables["dim_reduction/conv1/weights"][-1]
        outputs = extract_multiscale(
            model, feeds["input_image"], feeds["input_scales"], feeds["input_abs_thres"],
            feeds["input_max_feature_num"], feeds["input_global_scales_ind"], depth,
            variables["embed/biases"][0],
        )  # fmt: skip
        fetches = {name: tf.identity(tensor, name=name) for name, tensor in outputs.items()}
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            builder = tf.compat.v1.saved_model.Builder(path)
            signature = tf.compat.v1.saved_model.predict_signature_def(feeds, fetches)
            builder.add_meta_graph_and_variables(
                session, [tf.compat.v1.saved_model.SERVING], signature_def_map={"serving_default": signature}
            )
            builder.save()


# --- TF2: the reference's Keras DELG -----------------------------------------------------------------

layers = tf_keras.layers


def _init(seed: int) -> dict:
    return {"kernel_initializer": tf_keras.initializers.HeNormal(seed)}


def _randomise_batch_norms(model: tf_keras.Model, rng: np.random.Generator) -> None:
    """Give every BatchNormalization and bias non-trivial values (Keras initialises them to 0 / 1)."""
    for layer in model.submodules:
        if isinstance(layer, layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.gamma.assign(rng.uniform(0.5, 1.0, n).astype(np.float32))
            layer.beta.assign(rng.normal(0, 0.1, n).astype(np.float32))
            layer.moving_mean.assign(rng.normal(0, 0.1, n).astype(np.float32))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, n).astype(np.float32))
        elif isinstance(layer, (layers.Conv2D, layers.Dense)) and layer.use_bias:
            layer.bias.assign(rng.normal(0, 0.05, layer.bias.shape[0]).astype(np.float32))


class KerasBlock(tf_keras.Model):
    """The reference's _ConvBlock (shortcut) / _IdentityBlock: the stride on conv2a and the shortcut."""

    def __init__(self, width: int, stride: int, shortcut: bool, seed: int) -> None:
        super().__init__()
        self.conv2a = layers.Conv2D(width, 1, stride, **_init(seed))
        self.bn2a = layers.BatchNormalization()
        self.conv2b = layers.Conv2D(width, 3, padding="same", **_init(seed + 1))
        self.bn2b = layers.BatchNormalization()
        self.conv2c = layers.Conv2D(4 * width, 1, **_init(seed + 2))
        self.bn2c = layers.BatchNormalization()
        if shortcut:
            self.conv_shortcut = layers.Conv2D(4 * width, 1, stride, **_init(seed + 3))
            self.bn_shortcut = layers.BatchNormalization()
        self.shortcut = shortcut

    def call(self, x):
        y = tf.nn.relu(self.bn2a(self.conv2a(x), training=False))
        y = tf.nn.relu(self.bn2b(self.conv2b(y), training=False))
        y = self.bn2c(self.conv2c(y), training=False)
        shortcut = self.bn_shortcut(self.conv_shortcut(x), training=False) if self.shortcut else x
        return tf.nn.relu(y + shortcut)


class KerasResNet(tf_keras.Model):
    """The reference ResNet50 with block3_strides (a 1×1/2 max-pool after conv4), GeM p = 3, embedding."""

    def __init__(self, width: int, embedding_dim: int) -> None:
        super().__init__()
        self.conv1 = layers.Conv2D(width, 7, 2, padding="same", **_init(1))
        self.bn_conv1 = layers.BatchNormalization()
        self.stage_names = []
        for stage, count in zip((2, 3, 4, 5), (3, 4, 6, 3), strict=True):
            names = [f"l{stage}{letter}" for letter in string.ascii_lowercase[:count]]
            for i, name in enumerate(names):
                stride = 2 if stage in (3, 4) and i == 0 else 1
                block = KerasBlock(width * 2 ** (stage - 2), stride, i == 0, seed=10 * stage + 4 * i)
                setattr(self, name, block)
            self.stage_names.append(names)
        self.embedding_layer = layers.Dense(embedding_dim, **_init(2))

    def call(self, x):
        """(1, H, W, 3) → global prelogits (1, D), block3 after the subsampling (1, h, w, C)."""
        x = tf.nn.relu(self.bn_conv1(self.conv1(x), training=False))
        x = tf.nn.max_pool2d(x, 3, 2, "VALID")
        for names in self.stage_names[:3]:
            for name in names:
                x = getattr(self, name)(x)
        block3 = tf.nn.max_pool2d(x, 1, 2, "VALID")
        x = block3
        for name in self.stage_names[3]:
            x = getattr(self, name)(x)
        gem = tf.pow(tf.reduce_mean(tf.pow(tf.maximum(x, 1e-6), 3.0), axis=[1, 2]), 1.0 / 3.0)
        return self.embedding_layer(gem), block3


class KerasAttention(tf_keras.Model):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.conv1 = layers.Conv2D(hidden, 1, **_init(3))
        self.bn_conv1 = layers.BatchNormalization()
        self.conv2 = layers.Conv2D(1, 1, **_init(4))

    def call(self, x):
        return tf.nn.softplus(self.conv2(tf.nn.relu(self.bn_conv1(self.conv1(x), training=False))))


class KerasAutoencoder(tf_keras.Model):
    def __init__(self, reduced: int, expanded: int) -> None:
        super().__init__()
        self.conv1 = layers.Conv2D(reduced, 1, **_init(5))  # linear: the local descriptor
        self.conv2 = layers.Conv2D(expanded, 1, activation="relu", **_init(6))

    def call(self, x):
        reduced = self.conv1(x)
        return self.conv2(reduced), reduced


class KerasDelg(tf_keras.Model):
    """The reference's Delg: backbone, attention on block3 (as since PR #9906), autoencoder; training-only
    classifiers (cosine_weights of ArcFace, attn_classification) as a training checkpoint carries them."""

    def __init__(self, width: int, embedding_dim: int, hidden: int, reduced: int, classes: int = 5) -> None:
        super().__init__()
        self.backbone = KerasResNet(width, embedding_dim)
        self.attention = KerasAttention(hidden)
        self.autoencoder = KerasAutoencoder(reduced, 16 * width)
        self.attn_classification = layers.Dense(classes)
        self.cosine_weights = self.add_weight("cosine_weights", (embedding_dim, classes))

    def call(self, images):
        """→ global prelogits, attention on block3, the reduced local features."""
        global_feature, block3 = self.backbone(images)
        _, reduced = self.autoencoder(block3)
        return global_feature, self.attention(block3), reduced


class ExportModule(tf.Module):
    """What export_local_and_global_model.py saves: the model under ``_model`` and ExtractFeatures."""

    def __init__(self, model: KerasDelg, depth: int, global_dim: int) -> None:
        super().__init__()
        self._model = model
        self.depth, self.global_dim = depth, global_dim

    @tf.function(
        input_signature=[
            tf.TensorSpec(shape=[None, None, 3], dtype=tf.uint8, name="input_image"),
            tf.TensorSpec(shape=[None], dtype=tf.float32, name="input_scales"),
            tf.TensorSpec(shape=(), dtype=tf.int32, name="input_max_feature_num"),
            tf.TensorSpec(shape=(), dtype=tf.float32, name="input_abs_thres"),
            tf.TensorSpec(shape=[None], dtype=tf.int32, name="input_global_scales_ind"),
        ]
    )
    def ExtractFeatures(
        self, input_image, input_scales, input_max_feature_num, input_abs_thres, input_global_scales_ind
    ):
        return extract_multiscale(
            self._model, input_image, input_scales, input_abs_thres, input_max_feature_num,
            input_global_scales_ind, self.depth, self.global_dim,
        )  # fmt: skip


def build_keras_delg(width: int, embedding_dim: int, hidden: int, reduced: int, seed: int = 0) -> KerasDelg:
    model = KerasDelg(width, embedding_dim, hidden, reduced)
    model(tf.zeros([1, 64, 64, 3]))  # build every layer
    model.attn_classification(tf.zeros([1, 16 * width]))
    _randomise_batch_norms(model, np.random.default_rng(seed))
    return model


def export_keras_delg(path: str, model: KerasDelg) -> None:
    """Save ``model`` as the reference's exporter does (tf.saved_model.save of the module, serving
    signature = ExtractFeatures)."""
    depth, global_dim = model.autoencoder.conv1.filters, model.backbone.embedding_layer.units
    module = ExportModule(model, depth, global_dim)
    tf.saved_model.save(module, path, signatures={"serving_default": module.ExtractFeatures})
