"""DELG model: GeM, heads, stop-gradient, receptive-field geometry, backbones, weight loading."""

from __future__ import annotations

import hashlib
import io
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

from pipeline import storage
from pipeline.model import (
    BACKBONES,
    GLOBAL_POOLS,
    IMAGENET,
    Delg,
    NetVLAD,
    WeightsUnavailableError,
    gem,
    load_backbone_weights,
    load_pretrained,
    load_weights,
    mac,
    rmac,
    rmac_regions,
    spoc,
    weights_checksum,
)
from pipeline.model.catalog import BACKBONE_CHANNELS
from pipeline.model.delg import attention_pool
from pipeline.model.geometry import receptive_field, trace_main_path
from pipeline.model.resnet_ref import ReferenceResNet
from pipeline.model.resnet_slim import SlimResNet

SHARED = Path(__file__).resolve().parents[2] / "shared"
MOBILENET_WEIGHTS = SHARED / "weights" / "mobilenetv2_imagenet_features.pt"


def small_delg(**kwargs) -> Delg:
    torch.manual_seed(0)
    return Delg("mobilenet_v2", global_dim=kwargs.pop("global_dim", 1280), whitening=False, **kwargs).eval()


def test_gem_matches_a_manual_power_mean() -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 3, 4, 5, dtype=torch.float64) * 3
    x[0, 0, 0, 0] = -1.0  # clamped to eps before the power
    expected = torch.empty(2, 3, dtype=torch.float64)
    for b in range(2):
        for c in range(3):
            values = [max(float(v), 1e-6) for v in x[b, c].flatten()]
            expected[b, c] = (sum(v**3 for v in values) / len(values)) ** (1 / 3)
    assert torch.allclose(gem(x, 3.0).double(), expected, rtol=1e-6)
    # p = 1 is the average pool of non-negative inputs
    assert torch.allclose(gem(x.clamp(min=0), 1.0).double(), x.clamp(min=1e-6).mean((-2, -1)), rtol=1e-6)


def test_global_head_is_gem_then_whitening_then_l2() -> None:
    torch.manual_seed(0)
    model = Delg("mobilenet_v2", global_dim=64, whitening=True).eval()
    features = torch.rand(3, 1280, 4, 5)
    pooled = features.clamp(min=1e-6).pow(3).mean((-2, -1)).pow(1 / 3)
    expected = F.normalize(pooled @ model.whitening.weight.T + model.whitening.bias, dim=-1)
    assert torch.allclose(model.global_head(features), expected, atol=1e-6)


def test_extract_outputs_shapes_and_normalisation() -> None:
    model = small_delg(local_dim=32)
    out = model.extract(torch.randn(2, 3, 96, 64))
    assert out.attention.shape == (2, 6, 4) and bool((out.attention >= 0).all())  # softplus
    assert out.descriptors.shape == (2, 32, 6, 4)
    assert torch.allclose(out.descriptors.norm(dim=1), torch.ones(2, 6, 4), atol=1e-5)
    assert out.global_descriptor.shape == (2, 1280)
    assert torch.allclose(out.global_descriptor.norm(dim=1), torch.ones(2), atol=1e-5)
    assert model.extract(torch.randn(1, 3, 64, 64), with_global=False).global_descriptor is None


def test_local_head_sees_block3_through_a_stop_gradient() -> None:
    model = small_delg().train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.reconstruction.shape == out.local_features.shape == (2, 96, 4, 4)
    assert out.global_embedding.shape == (2, 1280) and out.attention.shape == (2, 4, 4)
    assert not out.local_features.requires_grad
    local_loss = out.attention.sum() + F.mse_loss(out.reconstruction, out.local_features)
    local_loss.backward(retain_graph=True)
    backbone = list(model.backbone.parameters())
    assert all(p.grad is None for p in backbone)  # local losses never reach the backbone
    assert model.attention.conv1.weight.grad is not None and model.autoencoder.encoder.weight.grad is not None
    out.global_embedding.sum().backward()
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in backbone)


def test_the_torch_free_catalog_agrees_with_the_registry() -> None:
    """pipeline.config checks presets against the catalog (no torch at CLI start-up); the networks built here
    must have exactly its channels (the shapes themselves are checked below)."""
    registry = {name: (spec.local_channels, spec.global_channels) for name, spec in BACKBONES.items()}
    assert registry == BACKBONE_CHANNELS


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbones_declare_their_channels_and_local_stride(name: str) -> None:
    model = Delg(name, global_dim=BACKBONES[name].global_channels, whitening=False).eval()
    with torch.no_grad():
        block3 = model.backbone.forward_local(torch.randn(1, 3, 64, 96))
        block4 = model.backbone.forward_global(block3)
    # block3_strides subsamples the Keras reference's block3; tf-slim strides the last unit of block3
    stride = 32 if name.endswith(("-ref", "-slim")) else 16
    assert block3.shape == (1, BACKBONES[name].local_channels, 64 // stride, 96 // stride)
    assert block4.shape[:2] == (1, BACKBONES[name].global_channels)
    assert block4.shape[-2:] == (2, 3)  # block4 is at stride 32 in every layout
    assert model.local_receptive_field().stride == stride


def test_trace_leaves_out_residual_shortcuts() -> None:
    backbone = Delg("resnet50").backbone
    path = trace_main_path(backbone.local_modules())
    shortcuts = {id(m) for name, m in backbone.net.named_modules() if "downsample" in name}
    assert not shortcuts & {id(m) for m in path}
    # conv1 + maxpool + three convs per bottleneck in layer1..3 (3 + 4 + 6 blocks)
    assert len(path) == 2 + 3 * (3 + 4 + 6)
    assert backbone.training  # tracing restores the training flag


@pytest.mark.parametrize(
    ("name", "height", "width", "row", "col"),
    [("mobilenet_v2", 288, 320, 9, 10), ("resnet50", 320, 352, 10, 11)],
)
def test_receptive_field_matches_the_input_gradient(
    name: str, height: int, width: int, row: int, col: int
) -> None:
    """The input pixels that influence one interior feature form a box centred on the computed centre."""
    torch.manual_seed(0)
    backbone = (
        Delg(name, global_dim=BACKBONES[name].global_channels, whitening=False).backbone.double().eval()
    )
    rf = receptive_field(backbone.local_modules())
    image = torch.randn(1, 3, height, width, dtype=torch.float64, requires_grad=True)
    features = backbone.forward_local(image)  # (1, C, h, w)
    features[0, :, row, col].sum().backward()
    rows, cols = torch.nonzero(image.grad[0].abs().sum(0) > 0, as_tuple=True)
    top, bottom, left, right = rows.min().item(), rows.max().item(), cols.min().item(), cols.max().item()
    assert top > 0 and left > 0 and bottom < height - 1 and right < width - 1  # not cut by the border
    assert ((left + right) / 2, (top + bottom) / 2) == (
        rf.offset + rf.stride * col,
        rf.offset + rf.stride * row,
    )
    # random weights reach every pixel of the theoretical field here (≤ holds in general)
    assert bottom - top + 1 == right - left + 1 == rf.size


def test_receptive_field_of_resnet_block3() -> None:
    rf = Delg("resnet50").local_receptive_field()
    # conv 7/2, maxpool 3/2, then each 3×3 conv adds 2 × (current stride): 3 + 4 + 6 blocks
    assert (rf.size, rf.stride, rf.offset) == (
        7 + 2 * 2 + 2 * 4 * 3 + 2 * 4 + 2 * 8 * 3 + 2 * 8 + 2 * 16 * 5,
        16,
        0.0,
    )
    assert rf.padding == (rf.size - 1) / 2


def test_reference_layout_geometry_is_traced_and_checked_against_the_gradient() -> None:
    """The reference layout's block3 (block3_strides): receptive field 291, stride 32. Its TF-'same' stem
    pads 2 before / 3 after on even sizes and 3 / 3 on odd ones, so true centres sit at 32·i + 3 or + 2;
    the reference's keypoints use its hard-coded box (291, 32, padding 145: centres 32·i)."""
    torch.manual_seed(0)
    net = ReferenceResNet((3, 4, 6, 3), base_width=4).double().eval()  # geometry does not depend on width
    modules = [net.get_submodule(name) for name in net.local_layers()]
    for height, width, offset in ((320, 352, 3.0), (321, 353, 2.0)):
        rf = receptive_field(modules, side=width)
        assert (rf.size, rf.stride, rf.offset) == (291, 32, offset)
        image = torch.randn(1, 3, height, width, dtype=torch.float64, requires_grad=True)
        x = image
        for module in modules:
            x = module(x)
        x[0, :, 5, 5].sum().backward()
        rows, cols = torch.nonzero(image.grad[0].abs().sum(0) > 0, as_tuple=True)
        assert (cols.min() + cols.max()).item() / 2 == (rows.min() + rows.max()).item() / 2 == offset + 32 * 5
        assert cols.max().item() - cols.min().item() + 1 == 291
    box = Delg("resnet50-ref").keypoint_field()
    assert (box.size, box.stride, box.padding) == (291, 32, 145.0)
    assert Delg("mobilenet_v2", global_dim=1280, whitening=False).keypoint_field().stride == 16  # traced


def test_reference_layout_follows_the_keras_resnet() -> None:
    net = Delg("resnet101-ref").backbone.net
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == 1 + 3 * (3 + 4 + 23 + 3) + 4 and all(c.bias is not None for c in convs)
    assert len(norms) == len(convs) and all(n.eps == 1e-3 for n in norms)
    # the stride sits on the first 1×1 conv (and the shortcut) of l3a and l4a; l5a keeps stride 1
    for block, stride in (("l2a", 1), ("l3a", 2), ("l4a", 2), ("l5a", 1)):
        b = net.get_submodule(block)
        assert (b.conv2a.stride, b.conv2b.stride, b.conv_shortcut.stride) == (
            (stride,) * 2,
            (1, 1),
            (stride,) * 2,
        )
    assert net.l4w.conv_shortcut is None and not hasattr(net, "l4x")  # 23 blocks: l4a … l4w
    assert (net.max_pool.kernel_size, net.max_pool.padding) == (3, 0)  # 'valid'
    assert (net.subsampling_layer.kernel_size, net.subsampling_layer.stride) == (1, 2)
    # the stem pads TF 'same': (2, 3) on an even side, (3, 3) on an odd one
    x = torch.randn(1, 3, 16, 17)
    stem = net.conv1
    expected = F.conv2d(F.pad(x, (3, 3, 2, 3)), stem.weight, stem.bias, stride=2)
    torch.testing.assert_close(stem(x), expected)
    assert stem(x).shape[-2:] == (8, 9)


@pytest.mark.parametrize("attention_input", ["block3", "reconstruction"])
def test_local_head_attends_to_its_input_and_pools_like_the_reference(attention_input: str) -> None:
    torch.manual_seed(0)
    model = small_delg(local_dim=16, attention_input=attention_input)
    images = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        block3 = model.backbone.forward_local(images)
        out = model.extract(images, with_global=False)
        reconstruction = F.relu(model.autoencoder.decoder(model.autoencoder.encoder(block3)))
        attended = block3 if attention_input == "block3" else reconstruction
        hidden = F.relu(model.attention.bn(model.attention.conv1(attended)))
        torch.testing.assert_close(out.attention, F.softplus(model.attention.conv2(hidden))[:, 0])
        train = model(images)
    torch.testing.assert_close(train.attention, out.attention)
    torch.testing.assert_close(train.reconstruction, reconstruction)
    # hand-computed pooling: for each image, mean over locations of attention · block3 / ‖block3‖
    b, c, h, w = block3.shape
    expected = torch.zeros(b, c)
    for i in range(b):
        for y in range(h):
            for x in range(w):
                v = block3[i, :, y, x]
                expected[i] += train.attention[i, y, x] * v / v.norm().clamp(min=1e-12)
    torch.testing.assert_close(train.attention_pooled, expected / (h * w), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attention_pool(block3, train.attention), train.attention_pooled)


def test_attention_defaults_to_block3_and_the_slim_heads_follow_the_released_files() -> None:
    assert Delg("mobilenet_v2", global_dim=1280, whitening=False).attention_input == "block3"
    torch.manual_seed(0)
    model = Delg("resnet50-slim", gem_learned=True, gem_p=2.5, autoencoder_activation="relu").eval()
    assert model.attention.conv1.bias is None and model.attention.bn.eps == 1e-5  # slim conv + BatchNorm
    encoder, decoder = model.autoencoder.encoder, model.autoencoder.decoder
    assert encoder.bias is None and decoder.bias is None
    block3 = torch.randn(1, 1024, 3, 4)
    with torch.no_grad():
        code = F.relu(model.autoencoder.encoder_bn(encoder(block3)))
        torch.testing.assert_close(model.autoencoder.encode(block3), code)
        torch.testing.assert_close(
            model.autoencoder.decode(code), F.relu(model.autoencoder.decoder_bn(decoder(code)))
        )
        block4 = torch.rand(1, 2048, 2, 3)
        assert float(model.gem_power) == 2.5  # a weight: the released files learned it
        model.gem_power.fill_(4.0)
        torch.testing.assert_close(model.pool(block4), gem(block4, 4.0))
    assert "gem_power" in model.state_dict() and "gem_power" not in Delg("resnet50-ref").state_dict()


def test_slim_layout_follows_tf_slim_resnet_v1() -> None:
    net = Delg("resnet101-slim").backbone.net
    assert isinstance(net, SlimResNet) and net.scope == "resnet_v1_101"
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == 1 + 3 * (3 + 4 + 23 + 3) + 4 and all(c.bias is None for c in convs)
    assert len(norms) == len(convs) and all(n.eps == 1e-5 for n in norms)
    # the stride sits on the 3×3 conv of the LAST unit of blocks 1–3; block4 keeps stride 1
    for block, units, stride in (("block1", 3, 2), ("block2", 4, 2), ("block3", 23, 2), ("block4", 3, 1)):
        strides = [net.get_submodule(f"{block}.unit_{u}.conv2.conv").stride for u in range(1, units + 1)]
        assert strides == [(1, 1)] * (units - 1) + [(stride, stride)]
        assert net.get_submodule(f"{block}.unit_1").shortcut is not None  # projection on unit_1 only
        assert all(net.get_submodule(f"{block}.unit_{u}").shortcut is None for u in range(2, units + 1))
        last = net.get_submodule(f"{block}.unit_{units}")
        assert (last.subsample is None) == (stride == 1)  # the identity shortcut is subsampled too
    assert net.checkpoint_scope("block3.unit_23.conv2") == "resnet_v1_101/block3/unit_23/bottleneck_v1/conv2"
    # conv2d_same stem: symmetric padding 3 on any size; then a 3×3/2 max-pool padded TF 'SAME'
    x = torch.randn(1, 3, 16, 17)
    stem = net.conv1.conv
    torch.testing.assert_close(stem(x), F.conv2d(F.pad(x, (3, 3, 3, 3)), stem.weight, stride=2))
    y = -torch.rand(1, 1, 8, 9)  # negative: a zero-padded pool would differ at the border
    expected = F.max_pool2d(F.pad(y, (1, 1, 0, 1), value=float("-inf")), 3, 2)  # pads (0, 1) even, (1, 1) odd
    torch.testing.assert_close(net.pool1(y), expected)
    # the subsampled identity shortcut: every other pixel, as slim's 1×1/2 max-pool
    z = torch.randn(1, 256, 7, 8)
    torch.testing.assert_close(net.block1.unit_3.subsample(z), z[..., ::2, ::2])


def test_slim_layout_geometry_is_traced_and_checked_against_the_gradient() -> None:
    """tf-slim block3: receptive field 291 at stride 32; centres at 32·i, or 32·i + 2 where the stem's output
    side is even (the 'SAME' max-pool then pads only after). Keypoints use the reference's box (32·i)."""
    torch.manual_seed(0)
    net = SlimResNet((3, 4, 6, 3), base_width=4).double().eval()  # geometry does not depend on width
    modules = [net.get_submodule(name) for name in net.local_layers()]
    for height, width, offset in ((320, 352, 2.0), (322, 354, 0.0)):  # stem outputs 176 / 177 wide
        rf = receptive_field(modules, side=width)
        assert (rf.size, rf.stride, rf.offset) == (291, 32, offset)
        image = torch.randn(1, 3, height, width, dtype=torch.float64, requires_grad=True)
        x = image
        for module in modules:
            x = module(x)
        x[0, :, 5, 5].sum().backward()
        rows, cols = torch.nonzero(image.grad[0].abs().sum(0) > 0, as_tuple=True)
        assert (cols.min() + cols.max()).item() / 2 == offset + 32 * 5
        assert (rows.min() + rows.max()).item() / 2 == offset + 32 * 5
        assert cols.max().item() - cols.min().item() + 1 == 291
    box = Delg("resnet50-slim").keypoint_field()
    assert (box.size, box.stride, box.padding) == (291, 32, 145.0)


# --- weights -------------------------------------------------------------------------------------------


def save(state_dict: dict, path: Path) -> str:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    path.write_bytes(buffer.getvalue())
    return str(path)


def test_load_weights_round_trip_and_checksum(tmp_path: Path) -> None:
    source = small_delg(local_dim=16)
    url = save(source.state_dict(), tmp_path / "delg.pt")
    target = Delg("mobilenet_v2", global_dim=1280, whitening=False, local_dim=16)
    checksum = load_weights(target, url)
    assert checksum == hashlib.sha256(Path(url).read_bytes()).hexdigest() == weights_checksum(url)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_load_weights_from_an_fsspec_url() -> None:
    source = small_delg(local_dim=16)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    storage.write_bytes("memory://weights-test/delg.pt", buffer.getvalue())
    target = Delg("mobilenet_v2", global_dim=1280, whitening=False, local_dim=16)
    load_weights(target, "memory://weights-test/delg.pt")
    assert torch.equal(target.autoencoder.encoder.weight, source.autoencoder.encoder.weight)


def test_strict_loading_lists_every_problem_in_one_error(tmp_path: Path) -> None:
    state_dict = small_delg(local_dim=16).state_dict()
    del state_dict["attention.conv2.bias"]
    state_dict["head.extra"] = torch.zeros(3)
    state_dict["autoencoder.decoder.weight"] = torch.zeros(96, 8, 1, 1)
    url = save(state_dict, tmp_path / "bad.pt")
    model = Delg("mobilenet_v2", global_dim=1280, whitening=False, local_dim=16)
    with pytest.raises(ValueError) as error:
        load_weights(model, url)
    message = str(error.value)
    assert "missing keys (1): attention.conv2.bias" in message
    assert "unexpected keys (1): head.extra" in message
    assert (
        "shape mismatches (1): autoencoder.decoder.weight: file (96, 8, 1, 1) vs model (96, 16, 1, 1)"
        in message
    )
    # non-strict: everything that fits is loaded, the rest keeps its init
    before = model.autoencoder.decoder.weight.clone()
    load_weights(model, url, strict=False)
    assert torch.equal(model.attention.conv1.weight, state_dict["attention.conv1.weight"])
    assert torch.equal(model.autoencoder.decoder.weight, before)


def test_missing_and_unreadable_weight_files(tmp_path: Path) -> None:
    model = small_delg()
    with pytest.raises(FileNotFoundError, match=r"weights file not found: .*nope\.pt"):
        load_weights(model, str(tmp_path / "nope.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pt is not a loadable torch state dict"):
        load_weights(model, str(tmp_path / "junk.pt"))
    url = save({"nested": {"a": torch.zeros(1)}}, tmp_path / "nested.pt")
    with pytest.raises(ValueError, match="flat mapping of parameter names to tensors"):
        load_weights(model, url)


def test_backbone_only_weights_load_into_the_backbone(tmp_path: Path) -> None:
    torch.manual_seed(1)
    imagenet_like = models.mobilenet_v2().state_dict()  # torchvision names, with the classifier
    url = save(imagenet_like, tmp_path / "mnv2.pt")
    model = small_delg()
    heads_before = model.attention.conv1.weight.clone()
    load_pretrained(model, url)  # detected as backbone-only by its keys
    assert torch.equal(model.backbone.net.features[0][0].weight, imagenet_like["features.0.0.weight"])
    assert torch.equal(model.attention.conv1.weight, heads_before)
    url = save({k: v for k, v in imagenet_like.items() if k != "features.18.1.bias"}, tmp_path / "short.pt")
    with pytest.raises(ValueError, match=r"missing keys \(1\): features\.18\.1\.bias"):
        load_backbone_weights(model, url)


def test_imagenet_download_failure_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached weights: torchvision must download
    model = small_delg()
    try:
        load_backbone_weights(model, IMAGENET)
    except WeightsUnavailableError as error:
        assert "could not download ImageNet weights for mobilenet_v2" in str(error)
        assert "offline?" in str(error) and "weights URL" in str(error)
    else:
        pytest.skip("ImageNet weights downloaded: this machine is online, the offline error cannot be shown")


@pytest.mark.shared
def test_shared_mobilenet_imagenet_weights_load() -> None:
    if not MOBILENET_WEIGHTS.exists():
        pytest.skip(f"shared weights absent: {MOBILENET_WEIGHTS} (../shared beside the checkout)")
    model = small_delg()
    checksum = load_backbone_weights(model, str(MOBILENET_WEIGHTS))
    expected = torch.load(MOBILENET_WEIGHTS, weights_only=True, map_location="cpu")
    assert checksum == hashlib.sha256(MOBILENET_WEIGHTS.read_bytes()).hexdigest()
    assert len(expected) == 312
    for key, value in expected.items():
        assert torch.equal(model.backbone.net.state_dict()[key], value), key


def test_unknown_backbone_and_bad_dims() -> None:
    with pytest.raises(ValueError, match=r"backbone 'vit' is not registered; allowed: \['mobilenet_v2'"):
        Delg("vit")
    with pytest.raises(ValueError, match="global_dim 64 without whitening must be 1280"):
        Delg("mobilenet_v2", global_dim=64, whitening=False)


def test_modules_are_plain_torch() -> None:
    model = small_delg()
    assert isinstance(model, nn.Module) and isinstance(model.backbone.net, models.MobileNetV2)


def test_backbone_local_head_keeps_feature_geometry():
    """local_head='backbone': attention is the feature norm, descriptors keep the features' cosines exactly
    (an isometric embedding when local_dim ≥ channels), and the projection is the same in every process."""
    from pipeline.model.delg import orthonormal_projection

    torch.manual_seed(0)
    model = Delg("mobilenet_v2", whitening=False, global_dim=1280, local_head="backbone").eval()
    images = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        block3 = model.backbone.forward_local(images)  # (1, C, h, w)
        out = model.extract(images, with_global=False)
    torch.testing.assert_close(out.attention, block3.norm(dim=1))
    features = F.normalize(block3.flatten(2)[0].T, dim=1)  # (h·w, C)
    descriptors = out.descriptors.flatten(2)[0].T  # (h·w, 128)
    torch.testing.assert_close(descriptors @ descriptors.T, features @ features.T, atol=1e-5, rtol=0)
    assert torch.equal(orthonormal_projection(96, 128), model.projection)
    assert not any("projection" in k for k in model.state_dict())  # state dicts stay the backbone's
    with pytest.raises(ValueError, match="local_head 'trained'"):
        Delg("mobilenet_v2", whitening=False, global_dim=1280, local_head="trained")


# --- global pooling heads -------------------------------------------------------------------------------


def test_mac_and_spoc_on_a_hand_computed_map() -> None:
    x = torch.tensor([[[[1.0, -2.0], [3.0, 0.5]], [[-1.0, -4.0], [-3.0, -2.0]]]])  # (1, 2, 2, 2)
    torch.testing.assert_close(mac(x), torch.tensor([[3.0, -1.0]]))
    torch.testing.assert_close(spoc(x), torch.tensor([[2.5 / 4, -10.0 / 4]]))


def test_rmac_regions_and_pooling_on_a_hand_computed_grid() -> None:
    # 3 × 5 map, 2 levels. Level 1: side 3; one extra region along the width (overlap (3 − 2) / 3 is
    # closest to 40 %), at 0 and 2. Level 2: side ⌊6 / 3⌋ = 2; rows at 0, 1; 3 columns at 0, 1.5 → 1, 3.
    expected = [(0, 0, 3), (0, 2, 3), (0, 0, 2), (0, 1, 2), (0, 3, 2), (1, 0, 2), (1, 1, 2), (1, 3, 2)]
    assert rmac_regions(3, 5, levels=2) == expected
    transposed = sorted((left, top, side) for top, left, side in expected)
    assert sorted(rmac_regions(5, 3, levels=2)) == transposed
    assert rmac_regions(4, 4, levels=1) == [(0, 0, 4)]  # square: no extra region
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3, 5)
    total = torch.zeros(2, 4)
    for top, left, side in expected:
        region_max = x[:, :, top : top + side, left : left + side].amax(dim=(-2, -1))
        total += region_max / region_max.norm(dim=1, keepdim=True)
    torch.testing.assert_close(rmac(x, levels=2), total)


def test_netvlad_on_a_hand_computed_example() -> None:
    pool = NetVLAD(channels=2, clusters=2)
    with torch.no_grad():
        pool.assign.weight.zero_()
        pool.assign.bias.copy_(torch.tensor([0.0, math.log(3.0)]))  # every location: a = (1/4, 3/4)
        pool.centroids.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    x = torch.tensor([[[[1.0, 0.0]], [[0.0, 2.0]]]])  # (1, C=2, 1, 2): features (1, 0) and (0, 2) → (0, 1)
    # V1 = ¼((1,0) − c1) + ¼((0,1) − c1) = (−¼, ¼); V2 = ¾((1,0) − c2) + ¾((0,1) − c2) = (¾, −¾);
    # each intra-normalised to ±1/√2, then the whole L2-normalised
    torch.testing.assert_close(pool(x), torch.tensor([[-0.5, 0.5, 0.5, -0.5]]))
    centroids = F.normalize(torch.randn(3, 2), dim=1)
    pool = NetVLAD(channels=2, clusters=3)
    pool.init_from_centroids(centroids)
    features = F.normalize(torch.randn(5, 2), dim=1)
    logits = pool.assign(features[:, :, None, None])[:, :, 0, 0]
    distances = torch.cdist(features, centroids).pow(2)  # softmax(2α c·x − α‖c‖²) = softmax(−α‖x − c‖²)
    torch.testing.assert_close(logits.softmax(1), (-pool.alpha * distances).softmax(1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("pool", GLOBAL_POOLS)
def test_every_global_pool_runs_in_the_model(pool: str) -> None:
    clusters = 4
    dim = 1280 * clusters if pool == "netvlad" else 1280
    torch.manual_seed(0)
    model = Delg("mobilenet_v2", global_dim=dim, whitening=False, global_pool=pool, netvlad_clusters=clusters)
    out = model.eval().extract(torch.randn(2, 3, 96, 64))
    assert out.global_descriptor.shape == (2, dim)
    torch.testing.assert_close(out.global_descriptor.norm(dim=1), torch.ones(2))
    assert any("netvlad" in k for k in model.state_dict()) == (pool == "netvlad")  # trainable
    with pytest.raises(ValueError, match="global_pool 'sum'"):
        Delg("mobilenet_v2", global_dim=1280, whitening=False, global_pool="sum")
