"""Reading TF checkpoints and SavedModels (TensorFlow is imported here, inside the functions that read) and
writing the converted state dict."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import storage
from pipeline.config import PRESETS, ExtractionConfig
from pipeline.convert.layout import (
    IGNORED,
    OBJECT_GRAPH,
    VALUE_SUFFIX,
    _describe,
    preset_for_layout,
    tf_layout,
    tf_to_state_dict,
)
from pipeline.errors import ConfigError, MissingInputError
from pipeline.model.delg import Delg
from pipeline.model.weights import sha256_hex, write_model_settings

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
    (any storage URL), with ``config``'s head variant recorded beside it (write_model_settings)."""
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
    checksum = sha256_hex(data)
    write_model_settings(out, config, detected=False, options=options, weights_sha256=checksum)
    return Conversion(
        storage.redact(out),
        checksum,
        len(state_dict),
        f"{layout[0]} ResNet-{layout[1]}",
        ignored,
        config,
    )
