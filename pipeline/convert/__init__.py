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

Rooms: :mod:`~pipeline.convert.layout` (TF names → modules and tensors), :mod:`~pipeline.convert.checkpoints`
(reading TF files, writing the state dict) and :mod:`~pipeline.convert.verify` (same features as the reference).
"""

from __future__ import annotations

from pipeline.convert.checkpoints import (
    Conversion,
    checkpoint_prefix,
    convert_weights,
    object_paths,
    read_checkpoint,
)
from pipeline.convert.layout import (
    IGNORED,
    KERAS_HEADS,
    LAYOUT,
    MODEL_ROOTS,
    OBJECT_GRAPH,
    SLIM_HEADS,
    SLIM_SCALARS,
    VALUE_SUFFIX,
    Rule,
    layer_table,
    preset_for_layout,
    tf_layout,
    tf_to_state_dict,
)
from pipeline.convert.verify import (
    FEEDS,
    FETCHES,
    VARIANT_SETTINGS,
    Comparison,
    compare_features,
    detect_variant,
    reference_features,
    variant_label,
    variants,
    verify_conversion,
)

__all__ = [
    "FEEDS",
    "FETCHES",
    "IGNORED",
    "KERAS_HEADS",
    "LAYOUT",
    "MODEL_ROOTS",
    "OBJECT_GRAPH",
    "SLIM_HEADS",
    "SLIM_SCALARS",
    "VALUE_SUFFIX",
    "VARIANT_SETTINGS",
    "Comparison",
    "Conversion",
    "Rule",
    "checkpoint_prefix",
    "compare_features",
    "convert_weights",
    "detect_variant",
    "layer_table",
    "object_paths",
    "preset_for_layout",
    "read_checkpoint",
    "reference_features",
    "tf_layout",
    "tf_to_state_dict",
    "variant_label",
    "variants",
    "verify_conversion",
]
