"""A small TF DELG with the reference's structure, variable names and serving signature (tests only).

Written from reading tensorflow/models research/delf (resnet50.py, delf_model.py, delg_model.py,
export_local_and_global_model.py, export_model_utils.py): the same attributes (so the checkpoint names
are the released SavedModels' ``_model/backbone/l2a/conv2a/kernel/...``), the same ops (TF 'same'
convolutions, 'valid' max-pool, Keras BatchNormalization at epsilon 1e-3, GeM then the embedding Dense,
attention on the autoencoder's reconstruction) and the same serving function (input_image, input_scales,
input_max_feature_num, input_abs_thres, input_global_scales_ind → boxes, features, scales, scores,
global_descriptors). Layers are tf.Modules holding the Keras layers' variables (kernel, bias, gamma, beta,
moving_mean, moving_variance): TF 2.21's Keras 3 tracks variables under other names than the Keras 2 the
released models were saved with, tf.Module attributes reproduce those names exactly.
"""

from __future__ import annotations

import string

import numpy as np
import tensorflow as tf

RF, PADDING = 291.0, 145.0  # the reference's hard-coded receptive box; stride 16 · 2 with block3_strides


class Conv(tf.Module):
    def __init__(
        self, rng: np.random.Generator, kernel: int, cin: int, cout: int, stride: int = 1, same=False
    ):
        super().__init__()
        std = np.sqrt(2.0 / (kernel * kernel * cin))
        self.kernel = tf.Variable(rng.normal(0, std, (kernel, kernel, cin, cout)).astype(np.float32))
        self.bias = tf.Variable(rng.normal(0, 0.05, cout).astype(np.float32))
        self.stride, self.padding = stride, "SAME" if same else "VALID"

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        return tf.nn.conv2d(x, self.kernel, self.stride, self.padding) + self.bias


class BatchNorm(tf.Module):
    def __init__(self, rng: np.random.Generator, channels: int):
        super().__init__()
        self.gamma = tf.Variable(rng.uniform(0.5, 1.5, channels).astype(np.float32))
        self.beta = tf.Variable(rng.normal(0, 0.1, channels).astype(np.float32))
        self.moving_mean = tf.Variable(rng.normal(0, 0.1, channels).astype(np.float32))
        self.moving_variance = tf.Variable(rng.uniform(0.5, 2.0, channels).astype(np.float32))

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        return tf.nn.batch_normalization(
            x, self.moving_mean, self.moving_variance, self.beta, self.gamma, 1e-3
        )


class Dense(tf.Module):
    def __init__(self, rng: np.random.Generator, cin: int, cout: int):
        super().__init__()
        self.kernel = tf.Variable(rng.normal(0, 1 / np.sqrt(cin), (cin, cout)).astype(np.float32))
        self.bias = tf.Variable(rng.normal(0, 0.05, cout).astype(np.float32))

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        return tf.matmul(x, self.kernel) + self.bias


class Block(tf.Module):
    """_ConvBlock (shortcut=True) / _IdentityBlock: the stride on conv2a and the shortcut."""

    def __init__(self, rng, cin: int, width: int, stride: int, shortcut: bool):
        super().__init__()
        self.conv2a, self.bn2a = Conv(rng, 1, cin, width, stride), BatchNorm(rng, width)
        self.conv2b, self.bn2b = Conv(rng, 3, width, width, same=True), BatchNorm(rng, width)
        self.conv2c, self.bn2c = Conv(rng, 1, width, 4 * width), BatchNorm(rng, 4 * width)
        if shortcut:
            self.conv_shortcut = Conv(rng, 1, cin, 4 * width, stride)
            self.bn_shortcut = BatchNorm(rng, 4 * width)
        self.shortcut = shortcut

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        y = tf.nn.relu(self.bn2a(self.conv2a(x)))
        y = tf.nn.relu(self.bn2b(self.conv2b(y)))
        y = self.bn2c(self.conv2c(y))
        return tf.nn.relu(y + (self.bn_shortcut(self.conv_shortcut(x)) if self.shortcut else x))


class ResNet(tf.Module):
    """The reference ResNet50 with block3_strides, GeM (p = 3) and the embedding layer."""

    def __init__(self, rng, width: int, embedding_dim: int):
        super().__init__()
        self.conv1, self.bn_conv1 = Conv(rng, 7, 3, width, 2, same=True), BatchNorm(rng, width)
        self.stage_names = []  # names only: a second path to the blocks would rename their variables
        cin = width
        for stage, count in zip((2, 3, 4, 5), (3, 4, 6, 3), strict=True):
            names = [f"l{stage}{letter}" for letter in string.ascii_lowercase[:count]]
            for i, name in enumerate(names):
                stride = 2 if stage in (3, 4) and i == 0 else 1
                setattr(self, name, Block(rng, cin, width * 2 ** (stage - 2), stride, shortcut=i == 0))
                cin = 4 * width * 2 ** (stage - 2)
            self.stage_names.append(names)
        self.embedding_layer = Dense(rng, cin, embedding_dim)

    def build_call(self, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(1, H, W, 3) → global prelogits (1, D), block3 after the 1×1 / 2 subsampling (1, h, w, C)."""
        x = tf.nn.relu(self.bn_conv1(self.conv1(x)))
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


class Attention(tf.Module):
    def __init__(self, rng, cin: int, hidden: int):
        super().__init__()
        self.conv1, self.bn_conv1 = Conv(rng, 1, cin, hidden), BatchNorm(rng, hidden)
        self.conv2 = Conv(rng, 1, hidden, 1)

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        return tf.nn.softplus(self.conv2(tf.nn.relu(self.bn_conv1(self.conv1(x)))))


class Autoencoder(tf.Module):
    def __init__(self, rng, cin: int, reduced: int):
        super().__init__()
        self.conv1, self.conv2 = Conv(rng, 1, cin, reduced), Conv(rng, 1, reduced, cin)

    def __call__(self, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        reduced = self.conv1(x)
        return tf.nn.relu(self.conv2(reduced)), reduced


class Delg(tf.Module):
    def __init__(self, rng, width: int, embedding_dim: int, hidden: int, reduced: int, classes: int = 5):
        super().__init__()
        self.backbone = ResNet(rng, width, embedding_dim)
        self.attention = Attention(rng, 16 * width, hidden)
        self.autoencoder = Autoencoder(rng, 16 * width, reduced)
        # training-only variables a checkpoint may carry: the ArcFace and attention classifiers
        self.cosine_weights = tf.Variable(rng.normal(size=(embedding_dim, classes)).astype(np.float32))
        self.attn_classification = Dense(rng, 16 * width, classes)

    def build_call(self, images: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """→ global prelogits, attention probabilities on the reconstruction, the reduced local features."""
        global_feature, block3 = self.backbone.build_call(images)
        expanded, reduced = self.autoencoder(block3)
        return global_feature, self.attention(expanded), reduced


class ExtractModule(tf.Module):
    def __init__(self, model: Delg, depth: int, global_dim: int):
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
        shape = tf.cast(tf.shape(input_image)[:2], tf.float32)
        image = ((tf.cast(input_image, tf.float32) - 128.0) / 128.0)[None]
        boxes, features = tf.zeros([0, 4]), tf.zeros([0, self.depth])
        scales, scores, globals_ = tf.zeros([0]), tf.zeros([0]), tf.zeros([0, self.global_dim])
        for i in tf.range(tf.shape(input_scales)[0]):
            tf.autograph.experimental.set_loop_options(
                shape_invariants=[
                    (boxes, tf.TensorShape([None, 4])),
                    (features, tf.TensorShape([None, self.depth])),
                    (scales, tf.TensorShape([None])),
                    (scores, tf.TensorShape([None])),
                    (globals_, tf.TensorShape([None, self.global_dim])),
                ]
            )
            scale = input_scales[i]
            resized = tf.image.resize(image, tf.cast(tf.round(shape * scale), tf.int32))
            global_feature, prob, feature_map = self._model.build_call(resized)
            height, width = tf.shape(feature_map)[1], tf.shape(feature_map)[2]
            x, y = tf.meshgrid(tf.range(width), tf.range(height))
            points = tf.cast(tf.reshape(tf.stack([y, x], axis=2), [-1, 2]), tf.float32)
            rf_boxes = 32.0 * tf.concat([points, points], 1) + [
                -PADDING,
                -PADDING,
                RF - 1 - PADDING,
                RF - 1 - PADDING,
            ]
            rf_boxes = rf_boxes / scale
            prob = tf.reshape(prob, [-1])
            keep = tf.reshape(tf.where(prob >= input_abs_thres), [-1])
            boxes = tf.concat([boxes, tf.gather(rf_boxes, keep)], 0)
            features = tf.concat([features, tf.gather(tf.reshape(feature_map, [-1, self.depth]), keep)], 0)
            kept = tf.gather(prob, keep)
            scores = tf.concat([scores, kept], 0)
            scales = tf.concat([scales, tf.ones_like(kept) / scale], 0)
            if tf.reduce_any(tf.equal(input_global_scales_ind, i)):
                globals_ = tf.concat([globals_, global_feature], 0)
        count = tf.minimum(input_max_feature_num, tf.shape(boxes)[0])
        selected = tf.image.non_max_suppression(boxes, scores, count, iou_threshold=1.0)  # sorts by score
        return {
            "boxes": tf.gather(boxes, selected),
            "features": tf.gather(features, selected),
            "scales": tf.gather(scales, selected),
            "scores": tf.expand_dims(tf.gather(scores, selected), 1),
            "global_descriptors": globals_,
        }


def export_small_delg(
    path: str, width: int, embedding_dim: int, hidden: int, reduced: int, seed: int = 0
) -> None:
    """Save a random small DELG as a SavedModel at ``path`` with the reference's serving signature."""
    model = Delg(np.random.default_rng(seed), width, embedding_dim, hidden, reduced)
    tf.saved_model.save(ExtractModule(model, reduced, embedding_dim), path)
