"""Released-weights conversion: the TF → PyTorch table, strictness, and the SavedModel's own extraction
against the converted PyTorch extractor on a small TF DELG built like the reference (tests/tf_delg.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from pipeline.config import ExtractionConfig
from pipeline.convert import (
    VALUE_SUFFIX,
    compare_features,
    convert_weights,
    layer_table,
    tf_to_state_dict,
    verify_conversion,
)
from pipeline.extract import ImageFeatures, build_extractor
from pipeline.model import BACKBONES, Delg
from pipeline.model.backbones import reference_backbone

TINY = "resnet50-ref-w4"  # the reference layout and names at a quarter … sixteenth of the widths
TINY_SPEC = reference_backbone(TINY, (3, 4, 6, 3), base_width=4)
DIMS = {"global_dim": 32, "local_dim": 16, "attention_hidden": 8}


@pytest.fixture(scope="module", autouse=True)
def tiny_backbone():
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(BACKBONES, TINY, TINY_SPEC)
        yield


def tiny_config(**kwargs) -> ExtractionConfig:
    return ExtractionConfig(backbone=TINY, max_side=128, **DIMS, **kwargs)


def fake_checkpoint(model: Delg, seed: int = 0) -> dict[str, np.ndarray]:
    """Checkpoint entries named like a released SavedModel's, with random values in TF layouts."""
    rng = np.random.default_rng(seed)
    entries = {
        "_CHECKPOINTABLE_OBJECT_GRAPH": np.zeros(0),
        "_model/cosine_weights" + VALUE_SUFFIX: np.ones(3),
    }
    for tf_path, (_, module) in layer_table(model).items():
        for name, param in module.named_parameters(recurse=False):
            shape = tuple(param.shape)
            if isinstance(module, torch.nn.Conv2d) and name == "weight":
                shape = (*shape[2:], shape[1], shape[0])  # HWIO
            elif isinstance(module, torch.nn.Linear) and name == "weight":
                shape = shape[::-1]
            keras = {"weight": "kernel", "bias": "bias"}
            if isinstance(module, torch.nn.BatchNorm2d):
                keras = {"weight": "gamma", "bias": "beta"}
            entries[f"_model/{tf_path}/{keras[name]}{VALUE_SUFFIX}"] = rng.normal(size=shape).astype(
                np.float32
            )
        if isinstance(module, torch.nn.BatchNorm2d):
            for stat in ("moving_mean", "moving_variance"):
                entries[f"_model/{tf_path}/{stat}{VALUE_SUFFIX}"] = rng.uniform(0.5, 1, module.num_features)
    return entries


def test_table_maps_every_layout_and_ignores_training_state() -> None:
    model = Delg.from_config(tiny_config())
    entries = fake_checkpoint(model)
    entries["_model/backbone/l3a/conv2a/kernel/.OPTIMIZER_SLOT/optimizer/momentum" + VALUE_SUFFIX] = np.ones(
        1
    )
    entries["optimizer/iter" + VALUE_SUFFIX] = np.ones(1)
    entries["save_counter" + VALUE_SUFFIX] = np.ones(1)
    state_dict, ignored = tf_to_state_dict(entries, model)
    assert len(ignored) == 5
    prefix, suffix = "_model/backbone/", VALUE_SUFFIX
    hwio = entries[f"{prefix}l3a/conv2b/kernel{suffix}"]  # (3, 3, in, out)
    assert torch.equal(
        state_dict["backbone.net.l3a.conv2b.weight"], torch.from_numpy(hwio.transpose(3, 2, 0, 1))
    )
    dense = entries[f"{prefix}embedding_layer/kernel{suffix}"]  # (in, out)
    assert torch.equal(state_dict["whitening.weight"], torch.from_numpy(dense.T.copy()))
    variance = entries[f"_model/attention/bn_conv1/moving_variance{suffix}"]
    assert torch.equal(state_dict["attention.bn.running_var"], torch.from_numpy(variance))
    assert torch.equal(
        state_dict["autoencoder.encoder.bias"],
        torch.from_numpy(entries[f"_model/autoencoder/conv1/bias{suffix}"]),
    )
    model.load_state_dict(state_dict)  # complete and strict
    # a training checkpoint names the model "model"
    renamed = {k.replace("_model/", "model/", 1): v for k, v in entries.items()}
    assert tf_to_state_dict(renamed, model)[0].keys() == state_dict.keys()


def test_unknown_and_missing_variables_are_listed() -> None:
    model = Delg.from_config(tiny_config())
    entries = fake_checkpoint(model)
    entries["_model/backbone/l4g/conv2a/kernel" + VALUE_SUFFIX] = np.ones((1, 1, 2, 2))  # an R101 block
    entries["_model/mystery/bias" + VALUE_SUFFIX] = np.ones(2)
    with pytest.raises(
        ValueError, match=r"2 checkpoint variables are neither mapped nor ignored.*l4g/conv2a.*mystery"
    ):
        tf_to_state_dict(entries, model)
    entries = fake_checkpoint(model)
    del entries["_model/attention/conv2/bias" + VALUE_SUFFIX]
    with pytest.raises(ValueError, match=r"missing keys \(1\): attention\.conv2\.bias"):
        tf_to_state_dict(entries, model)


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


# --- against a real TF SavedModel ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    pytest.importorskip("tensorflow", reason="the convert extra (tensorflow-cpu) is not installed")
    from tests.tf_delg import export_small_delg

    path = str(tmp_path_factory.mktemp("tf") / "delg")
    export_small_delg(path, width=4, embedding_dim=32, hidden=8, reduced=16)
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


def test_converted_weights_extract_what_the_saved_model_extracts(
    saved_model: str, photo: str, tmp_path: Path
) -> None:
    weights = str(tmp_path / "delg.pt")
    conversion = convert_weights(saved_model, weights, tiny_config())
    assert conversion.tensors == len(Delg.from_config(tiny_config()).state_dict())
    assert sorted(conversion.ignored) == [
        "_CHECKPOINTABLE_OBJECT_GRAPH",
        "_model/attn_classification/bias" + VALUE_SUFFIX,
        "_model/attn_classification/kernel" + VALUE_SUFFIX,
        "_model/cosine_weights" + VALUE_SUFFIX,
    ]
    assert (
        convert_weights(saved_model + "/variables", str(tmp_path / "b.pt"), tiny_config()).sha256
        == conversion.sha256
    )
    config = separated_cuts(tiny_config(), weights, photo)
    comparison = verify_conversion(saved_model, weights, photo, config)
    # all 7 scales, threshold and top-K active: every reference keypoint reproduced
    assert comparison.reference_keypoints == comparison.converted_keypoints == config.max_local_features
    assert comparison.matched == comparison.reference_keypoints and comparison.max_distance <= 0.5
    assert comparison.global_cosine >= 0.9999
    assert comparison.max_score_error <= 1e-3 and comparison.max_descriptor_error <= 1e-3
    assert comparison.passes(min_matched=1.0)


def test_convert_weights_cli_verifies(saved_model: str, photo: str, tmp_path: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from pipeline import cli
    from pipeline.config import PRESETS

    monkeypatch.setitem(PRESETS, "tiny", tiny_config(attention_threshold=0.0, max_local_features=10_000))
    out = str(tmp_path / "cli.pt")
    result = CliRunner().invoke(
        cli.app, ["convert-weights", saved_model, out, "--preset", "tiny", "--verify", photo]
    )
    assert result.exit_code == 0, result.output
    assert "global_cosine" in result.output and "matched" in result.output and Path(out).exists()
    result = CliRunner().invoke(
        cli.app, ["convert-weights", saved_model + "/variables", out, "--preset", "tiny", "--verify", photo]
    )
    assert result.exit_code != 0 and "not a SavedModel directory" in str(result.exception)


def test_the_dev_lock_installs_tensorflow_for_these_tests() -> None:
    """`make test` installs requirements/dev.lock, which must carry the convert extra (TensorFlow)."""
    lock = (Path(__file__).resolve().parents[1] / "requirements" / "dev.lock").read_text()
    assert "\ntensorflow-cpu==" in lock and "platform_machine == 'x86_64'" in lock
    assert "--extra convert" in (Path(__file__).resolve().parents[1] / "scripts" / "lock.sh").read_text()
