"""Weights conversion: the TF → PyTorch tables of both layouts, strictness, and each kind of real TF artifact
(tests/tf_delg.py) converted and verified against its own graph: a TF1 SavedModel with exactly the released
files' variable names and shapes (the full R50), a small TF2 export of the reference's Keras DELG, its
``delf_weights`` and training checkpoints."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from pipeline import store
from pipeline.config import PRESETS, ExtractionConfig
from pipeline.convert import (
    SLIM_SCALARS,
    compare_features,
    convert_weights,
    detect_variant,
    layer_table,
    tf_to_state_dict,
    verify_conversion,
)
from pipeline.errors import InputError
from pipeline.extraction import ExtractionJob, run_extraction
from pipeline.features import ImageFeatures, build_extractor
from pipeline.model import BACKBONES, Delg
from pipeline.model.backbones import reference_backbone, slim_backbone
from pipeline.model.catalog import BACKBONE_CHANNELS
from pipeline.model.weights import (
    config_for_weights,
    model_settings_url,
    weights_checksum,
    write_model_settings,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
RELEASED_VARIABLES = SHARED / "delg" / "r50delg_gldv2clean_20200914.variables.tsv"
TINY = "resnet50-ref-w4"  # the Keras reference layout and names at a sixteenth of the widths
TINY_SLIM = "resnet50-slim-w4"  # the tf-slim layout, same
TINY_SPECS = {
    TINY: reference_backbone(TINY, (3, 4, 6, 3), base_width=4),
    TINY_SLIM: slim_backbone(TINY_SLIM, (3, 4, 6, 3), base_width=4),
}
DIMS = {"global_dim": 32, "local_dim": 16, "attention_hidden": 8}


@pytest.fixture(scope="module", autouse=True)
def tiny_backbones():
    with pytest.MonkeyPatch.context() as patch:
        for name, spec in TINY_SPECS.items():
            patch.setitem(BACKBONES, name, spec)
            patch.setitem(BACKBONE_CHANNELS, name, (spec.local_channels, spec.global_channels))
        yield


def tiny_config(backbone: str = TINY, **kwargs) -> ExtractionConfig:
    return ExtractionConfig(backbone=backbone, max_side=128, **DIMS, **kwargs)


def released_r50(**kwargs) -> ExtractionConfig:
    """The released R50 preset on small images (the test photo is capped to 128 px)."""
    return dataclasses.replace(PRESETS["delg-r50-gldv2"], max_side=128, **kwargs)


def tf_shapes(model: Delg) -> dict[str, tuple[int, ...]]:
    """The TF variable names and shapes that ``model`` takes, from the converter's own table."""
    slim = model.backbone.spec.tf_layout[0] == "slim"
    shapes = {}
    for scope, (_, module) in layer_table(model).items():
        if isinstance(module, torch.nn.BatchNorm2d):
            names = ("gamma", "beta", "moving_mean", "moving_variance")
            shapes |= {f"{scope}/{n}": (module.num_features,) for n in names}
            continue
        weight = tuple(module.weight.shape)
        kernel = (*weight[2:], weight[1], weight[0]) if isinstance(module, torch.nn.Conv2d) else weight[::-1]
        shapes[f"{scope}/{'weights' if slim else 'kernel'}"] = kernel
        if module.bias is not None:
            shapes[f"{scope}/{'biases' if slim else 'bias'}"] = (weight[0],)
    if model.gem_power is not None:
        shapes |= dict.fromkeys(SLIM_SCALARS, ())
    return shapes


def fake_checkpoint(model: Delg, root: str = "_model/", seed: int = 0) -> dict[str, np.ndarray]:
    """Resolved checkpoint entries for ``model`` (Keras names under ``root``), random values in TF layouts."""
    rng = np.random.default_rng(seed)
    entries = {name: rng.normal(size=shape).astype(np.float32) for name, shape in tf_shapes(model).items()}
    return {root + name: value for name, value in entries.items()}


def test_keras_table_maps_every_layout_and_ignores_training_state() -> None:
    model = Delg.from_config(tiny_config())
    entries = fake_checkpoint(model)
    entries |= {
        "_CHECKPOINTABLE_OBJECT_GRAPH": np.zeros(0),
        "_model/cosine_weights": np.ones(3),
        "_model/backbone/l3a/conv2a/kernel/.OPTIMIZER_SLOT/optimizer/momentum": np.ones(1),
        "optimizer/iter": np.ones(1),
        "save_counter": np.ones(1),
    }
    state_dict, ignored = tf_to_state_dict(entries, model)
    assert len(ignored) == 5
    hwio = entries["_model/backbone/l3a/conv2b/kernel"]  # (3, 3, in, out)
    assert torch.equal(
        state_dict["backbone.net.l3a.conv2b.weight"], torch.from_numpy(hwio.transpose(3, 2, 0, 1))
    )
    dense = entries["_model/backbone/embedding_layer/kernel"]  # (in, out)
    assert torch.equal(state_dict["whitening.weight"], torch.from_numpy(dense.T.copy()))
    variance = entries["_model/attention/bn_conv1/moving_variance"]
    assert torch.equal(state_dict["attention.bn.running_var"], torch.from_numpy(variance))
    bias = entries["_model/autoencoder/conv1/bias"]
    assert torch.equal(state_dict["autoencoder.encoder.bias"], torch.from_numpy(bias))
    model.load_state_dict(state_dict)  # complete and strict
    # a training checkpoint names the model "model", the exporter's delf_weights put it at the root
    for root in ("model/", ""):
        renamed = {
            (root + k[len("_model/") :] if k.startswith("_model/") else k): v for k, v in entries.items()
        }
        assert tf_to_state_dict(renamed, model)[0].keys() == state_dict.keys()


def test_unknown_and_missing_variables_are_listed() -> None:
    model = Delg.from_config(tiny_config())
    entries = fake_checkpoint(model)
    entries["_model/backbone/l4g/conv2a/kernel"] = np.ones((1, 1, 2, 2))  # an R101 block
    entries["_model/mystery/bias"] = np.ones(2)
    with pytest.raises(
        ValueError, match=r"keras ResNet-53 DELG, the model's backbone \S+ a keras ResNet-50$"
    ):
        tf_to_state_dict(entries, model)  # seven conv4 blocks: not this model's layout
    del entries["_model/backbone/l4g/conv2a/kernel"]
    with pytest.raises(ValueError, match=r"1 checkpoint variables are neither mapped nor ignored.*mystery"):
        tf_to_state_dict(entries, model)
    entries = fake_checkpoint(model)
    del entries["_model/attention/conv2/bias"]
    with pytest.raises(ValueError, match=r"missing keys \(1\): attention\.conv2\.bias"):
        tf_to_state_dict(entries, model)


@pytest.mark.skipif(not RELEASED_VARIABLES.exists(), reason="../shared/delg is not available")
def test_the_released_variable_list_fills_the_slim_preset_exactly() -> None:
    """Every one of the released r50 file's 285 variables maps, at its shape, and nothing is left unfilled."""
    from tests.tf_delg import read_variable_list

    released = read_variable_list(RELEASED_VARIABLES)
    model = Delg.from_config(PRESETS["delg-r50-gldv2"])
    assert tf_shapes(model) == released
    rng = np.random.default_rng(0)
    entries = {name: rng.normal(size=shape).astype(np.float32) for name, shape in released.items()}
    state_dict, ignored = tf_to_state_dict(entries, model)
    assert ignored == [] and float(state_dict["gem_power"]) == float(entries["gem/gem_power"])
    unit = "resnet_v1_50/block2/unit_4/bottleneck_v1/conv2"  # block2's last unit: the stride-2 3×3
    assert torch.equal(
        state_dict["backbone.net.block2.unit_4.conv2.conv.weight"],
        torch.from_numpy(entries[f"{unit}/weights"].transpose(3, 2, 0, 1)),
    )
    assert torch.equal(
        state_dict["autoencoder.decoder_bn.running_mean"],
        torch.from_numpy(entries["dim_expand/conv1/BatchNorm/moving_mean"]),
    )
    r101 = {name.replace("resnet_v1_50/", "resnet_v1_101/"): value for name, value in entries.items()}
    with pytest.raises(ValueError, match=r"slim ResNet-101 DELG.*use --preset delg-r101-gldv2"):
        tf_to_state_dict(r101, model)


def test_comparison_counts_and_tolerances() -> None:
    rng = np.random.default_rng(0)
    descriptors = rng.normal(size=(4, 8)).astype(np.float32)
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    reference = ImageFeatures(
        np.array([1.0, 0.0], np.float32),
        np.array([[0, 0], [32, 0], [0, 32], [64, 64]], np.float32),
        np.array([1.0, 1.0, 0.5, 2.0], np.float32),
        np.array([10.0, 9.0, 8.0, 7.0], np.float32),
        descriptors,
    )
    moved = dataclasses.replace(
        reference, keypoints=reference.keypoints + np.array([[0.3, 0.3], [0, 0], [0, 0], [0, 0]], np.float32)
    )
    same = compare_features(reference, moved)
    assert (same.matched, same.global_cosine, same.max_score_error) == (4, 1.0, 0.0)
    assert same.max_distance == pytest.approx(0.3 * 2**0.5) and same.passes(min_matched=1.0)
    other_scale = dataclasses.replace(reference, scales=np.array([1.0, 1.0, 0.5, 1.0], np.float32))
    assert compare_features(reference, other_scale).matched == 3  # a keypoint pairs only at its own scale
    scores = dataclasses.replace(reference, scores=reference.scores * np.float32(1.002))
    assert not compare_features(reference, scores).passes()
    turned = dataclasses.replace(reference, global_descriptor=np.array([0.99, 0.141], np.float32))
    assert not compare_features(reference, turned).passes()


# --- against real TF artifacts ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tf_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The TF2 reference's Keras DELG (small) as SavedModel, delf_weights and training checkpoint."""
    pytest.importorskip("tf_keras", reason="the convert extra (tensorflow-cpu, tf-keras) is not installed")
    import tensorflow as tf

    from tests.tf_delg import build_keras_delg, export_keras_delg

    root = tmp_path_factory.mktemp("tf")
    model = build_keras_delg(width=4, embedding_dim=32, hidden=8, reduced=16)
    export_keras_delg(str(root / "keras"), model)
    model.save_weights(str(root / "delf_weights"))
    tf.train.Checkpoint(model=model).write(str(root / "training" / "ckpt"))
    return root


@pytest.fixture(scope="module")
def released_layout_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A TF1 SavedModel with exactly the released r50 file's variable names and shapes."""
    pytest.importorskip("tensorflow", reason="the convert extra (tensorflow-cpu) is not installed")
    if not RELEASED_VARIABLES.exists():
        pytest.skip("../shared/delg is not available")
    from tests.tf_delg import export_slim_delg, read_variable_list

    path = str(tmp_path_factory.mktemp("tf1") / "r50delg")
    export_slim_delg(path, read_variable_list(RELEASED_VARIABLES))
    return path


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(data.astronaut()[100:300, 50:350]).save(path)  # 200 × 300: capped to 85 × 128
    return str(path)


def separated_cuts(config: ExtractionConfig, weights: str, photo: str) -> ExtractionConfig:
    """Threshold and top-K placed in wide gaps of this model's scores, so float noise cannot flip them."""
    pixels = torch.from_numpy(np.asarray(Image.open(photo)).copy()).permute(2, 0, 1)
    everything = dataclasses.replace(config, attention_threshold=0.0, max_local_features=100_000)
    scores = np.sort(build_extractor(everything, weights, device="cpu").extract_single(pixels).scores)[::-1]
    gaps = (scores[:-1] - scores[1:]) / scores[:-1]  # gap after position i

    def widest(lo: int, hi: int) -> int:
        return lo + int(np.argmax(gaps[lo:hi]))

    cut = widest(len(scores) // 4, 3 * len(scores) // 4)  # threshold keeps scores[: cut + 1]
    top = widest((cut + 1) // 4, 3 * (cut + 1) // 4)  # top-K keeps scores[: top + 1]
    threshold = float(scores[cut] + scores[cut + 1]) / 2
    return dataclasses.replace(config, attention_threshold=threshold, max_local_features=top + 1)


def assert_reproduced(saved_model: str, weights: str, photo: str, config: ExtractionConfig) -> None:
    """All 7 scales, threshold and top-K active: every reference keypoint reproduced within tolerance."""
    config = separated_cuts(config, weights, photo)
    comparison = verify_conversion(saved_model, weights, photo, config)
    assert comparison.reference_keypoints == comparison.converted_keypoints == config.max_local_features
    assert comparison.matched == comparison.reference_keypoints and comparison.max_distance <= 0.5
    assert comparison.global_cosine >= 0.9999
    assert comparison.max_score_error <= 1e-3 and comparison.max_descriptor_error <= 1e-3


def test_a_tf1_saved_model_with_the_released_names_converts_and_reproduces_its_graph(
    released_layout_model: str, photo: str, tmp_path: Path
) -> None:
    weights = str(tmp_path / "r50.pt")
    conversion = convert_weights(released_layout_model, weights)  # the preset follows the file
    assert conversion.config == PRESETS["delg-r50-gldv2"] and conversion.layout == "slim ResNet-50"
    assert conversion.ignored == [] and conversion.tensors == len(
        Delg.from_config(conversion.config).state_dict()
    )
    assert_reproduced(released_layout_model, weights, photo, released_r50())


def test_a_tf2_reference_export_and_its_checkpoints_convert_and_reproduce_it(
    tf_artifacts: Path, photo: str, tmp_path: Path
) -> None:
    import tensorflow as tf

    saved_model = str(tf_artifacts / "keras")
    keys = [name for name, _ in tf.train.list_variables(saved_model + "/variables/variables")]
    assert any("/variables/" in key for key in keys)  # Keras 2 keys run through layers' variable lists
    weights = str(tmp_path / "delg.pt")
    conversion = convert_weights(saved_model, weights, tiny_config())
    assert conversion.layout == "keras ResNet-50"
    assert sorted(conversion.ignored) == [
        "_CHECKPOINTABLE_OBJECT_GRAPH",
        "_model/attn_classification/bias",
        "_model/attn_classification/kernel",
        "_model/cosine_weights",
    ]
    for checkpoint in ("delf_weights", "training/ckpt"):  # the same weights, other roots
        other = convert_weights(str(tf_artifacts / checkpoint), str(tmp_path / "b.pt"), tiny_config())
        assert other.sha256 == conversion.sha256
    assert_reproduced(saved_model, weights, photo, tiny_config())
    wrong = verify_conversion(
        saved_model, weights, photo, tiny_config(attention_input="reconstruction", attention_threshold=0.0)
    )
    assert not wrong.passes()  # the attention input matters: the setting is what makes it exact


@pytest.fixture(scope="module")
def variant_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small TF1 file whose heads differ from the preset's: attention on the reconstruction, ReLU code."""
    pytest.importorskip("tensorflow", reason="the convert extra (tensorflow-cpu) is not installed")
    from tests.tf_delg import export_slim_delg

    path = str(tmp_path_factory.mktemp("tf1") / "variant")
    variables = tf_shapes(Delg.from_config(tiny_config(TINY_SLIM, gem_learned=True)))
    export_slim_delg(path, variables, attention_input="reconstruction", activation="relu")
    return path


def test_convert_weights_cli_verifies_and_detects_the_variant(
    variant_model: str, photo: str, tmp_path: Path, monkeypatch
) -> None:
    from typer.testing import CliRunner

    from pipeline import cli

    config = tiny_config(TINY_SLIM, gem_learned=True, attention_threshold=0.0, max_local_features=10**5)
    monkeypatch.setitem(PRESETS, "tiny-slim", config)
    out = str(tmp_path / "cli.pt")
    command = ["convert-weights", variant_model, out, "--preset", "tiny-slim", "--verify", photo]
    result = CliRunner().invoke(cli.app, command)
    assert result.exit_code == 1 and "verification failed" in result.output  # the preset's heads differ
    assert "slim ResNet-50" in result.output and "global_cosine" in result.output and Path(out).exists()
    result = CliRunner().invoke(cli.app, [*command, "--detect"])
    assert result.exit_code == 0, result.output
    detected = "detected: attention_input=reconstruction, autoencoder_activation=relu (not the preset's)"
    assert detected in result.output
    found, comparisons = detect_variant(variant_model, out, photo, config)  # what the CLI printed
    assert found == dataclasses.replace(
        config, attention_input="reconstruction", autoencoder_activation="relu"
    )
    assert [c.passes() for c in comparisons.values()] == [False, False, False, True]
    recorded = json.loads(Path(model_settings_url(out)).read_text())
    assert recorded["detected"] and recorded["settings"] == {
        "attention_input": "reconstruction",
        "autoencoder_activation": "relu",
    }
    assert f"--preset tiny-slim --weights {out}" in result.output  # the command that applies it
    # Extraction with the preset and these weights applies the detected heads and the file's learned GeM
    # exponent, and records them: the recorded config (what the query service loads) reproduces the file.
    manifest = Path(photo).parent / "m.csv"  # local rows are read under the manifest's folder
    manifest.write_text(f"id,url\nphoto,{photo}\n")
    run_extraction(ExtractionJob(str(manifest), str(tmp_path / "store"), config, out), in_process=True)
    info = store.read_run_info(str(tmp_path / "store"))
    learned = float(torch.load(out)["gem_power"])
    assert learned != config.gem_p and info["preset"] == "tiny-slim"
    assert info["config"] == dataclasses.replace(found, gem_p=learned).to_dict()
    assert verify_conversion(variant_model, out, photo, ExtractionConfig.from_dict(info["config"])).passes()
    result = CliRunner().invoke(cli.app, ["convert-weights", variant_model + "/variables", out, *command[3:]])
    assert result.exit_code != 0 and "not a SavedModel directory" in str(result.exception)


def test_model_settings_beside_weights_apply_only_to_those_weights(tmp_path: Path) -> None:
    config = tiny_config(TINY_SLIM, gem_learned=True)
    model = Delg.from_config(config)
    torch.nn.init.constant_(model.gem_power, 2.5)
    weights = str(tmp_path / "w.pt")
    torch.save(model.state_dict(), weights)
    checksum = hashlib.sha256(Path(weights).read_bytes()).hexdigest()
    assert config_for_weights(config, weights) == (
        dataclasses.replace(config, gem_p=2.5),
        checksum,
    )  # no sidecar
    variant = dataclasses.replace(config, attention_input="reconstruction")
    write_model_settings(weights, variant, detected=True)
    assert config_for_weights(config, weights) == (dataclasses.replace(variant, gem_p=2.5), checksum)
    assert config_for_weights(dataclasses.replace(config, gem_learned=False), weights)[0].gem_p == 3.0
    assert config_for_weights(config, "imagenet") == (config, None)
    torch.nn.init.constant_(model.gem_power, 2.0)
    torch.save(model.state_dict(), weights)  # other weights under the same name: the sidecar is stale
    with pytest.raises(InputError, match="describes other weights"):
        config_for_weights(config, weights)
    bad = {"weights_sha256": weights_checksum(weights), "settings": {"attention_input": "block9"}}
    Path(model_settings_url(weights)).write_text(json.dumps(bad))
    with pytest.raises(InputError, match="block9"):
        config_for_weights(config, weights)


def test_the_dev_lock_installs_tensorflow_for_these_tests() -> None:
    """`make test` installs requirements/dev.lock, which must carry the convert extra (TensorFlow)."""
    lock = (Path(__file__).resolve().parents[1] / "requirements" / "dev.lock").read_text()
    assert "\ntensorflow-cpu==" in lock and "platform_machine == 'x86_64'" in lock
    assert "--extra convert" in (Path(__file__).resolve().parents[1] / "scripts" / "lock.sh").read_text()
