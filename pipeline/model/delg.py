"""DELG (Cao, Araujo, Sim 2020): one backbone, a global GeM head and an attentive local head.

The global pooling is selectable (pipeline.model.pooling: GeM as DELG, MAC, SPoC, R-MAC, NetVLAD).

Pure torch: no I/O, no Ray. ``forward`` returns what training needs; ``extract`` what extraction needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ATTENTION_INPUTS, AUTOENCODER_ACTIVATIONS
from pipeline.errors import ConfigError
from pipeline.model.backbones import Backbone, get_backbone_spec
from pipeline.model.geometry import ReceptiveField, receptive_field
from pipeline.model.pooling import GLOBAL_POOLS, NetVLAD, gem, mac, pooled_dim, rmac, spoc

__all__ = ["Delg", "DelgOutput", "LocalAndGlobal", "attention_pool", "gem"]

if TYPE_CHECKING:
    from pipeline.config import ExtractionConfig


class Attention(nn.Module):
    """Per-location attention score ≥ 0: 1×1 conv → BN → ReLU → 1×1 conv (1 channel) → softplus.

    Keras heads (the TF2 reference): conv1 has a bias, BatchNorm ε 1e-3. tf-slim heads (the released TF1
    files, built in resnet_arg_scope): conv1 is bias-free, BatchNorm ε 1e-5."""

    def __init__(self, in_channels: int, hidden: int, slim: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, hidden, kernel_size=1, bias=not slim)
        self.bn = nn.BatchNorm2d(hidden, eps=1e-5 if slim else 1e-3)
        self.conv2 = nn.Conv2d(hidden, 1, kernel_size=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) → (B, h, w)."""
        x = F.relu(self.bn(self.conv1(features)))
        return F.softplus(self.conv2(x)).squeeze(1)


class Autoencoder(nn.Module):
    """Dimensionality reduction of block3 features; the code is the local descriptor.

    Keras heads (the TF2 reference): convs with biases, a linear code. tf-slim heads (the released TF1
    files): bias-free convs, each followed by BatchNorm (ε 1e-5). ``activation`` applies to the code."""

    def __init__(self, in_channels: int, code_dim: int, slim: bool = False, activation: str = "none") -> None:
        super().__init__()
        if activation not in AUTOENCODER_ACTIVATIONS:
            raise ConfigError(
                f"autoencoder activation {activation!r}; allowed: {list(AUTOENCODER_ACTIVATIONS)}"
            )
        self.encoder = nn.Conv2d(in_channels, code_dim, kernel_size=1, bias=not slim)
        self.decoder = nn.Conv2d(code_dim, in_channels, kernel_size=1, bias=not slim)
        self.encoder_bn = nn.BatchNorm2d(code_dim, eps=1e-5) if slim else None
        self.decoder_bn = nn.BatchNorm2d(in_channels, eps=1e-5) if slim else None
        self.activation = activation

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) → (B, code_dim, h, w)."""
        code = self.encoder(features)
        if self.encoder_bn is not None:
            code = self.encoder_bn(code)
        return F.relu(code) if self.activation == "relu" else code

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        """(B, code_dim, h, w) → (B, C, h, w), ReLU like the block3 features it reconstructs."""
        x = self.decoder(code)
        if self.decoder_bn is not None:
            x = self.decoder_bn(x)
        return F.relu(x)


LOCAL_HEADS = ("learned", "backbone")
PROJECTION_SEED = 20200401  # fixed: the projection is part of the model, identical in every process


def orthonormal_projection(in_channels: int, out_dim: int, seed: int = PROJECTION_SEED) -> torch.Tensor:
    """(out_dim, in_channels) fixed random matrix with orthonormal rows or columns.

    With out_dim ≥ in_channels it is an isometry (cosines between features are kept exactly); with fewer
    dimensions it is a Johnson–Lindenstrauss projection that keeps them approximately.
    """
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(max(in_channels, out_dim), min(in_channels, out_dim), generator=generator)
    q, _ = torch.linalg.qr(gaussian)  # orthonormal columns
    return q if out_dim >= in_channels else q.T


def attention_pool(features: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """The reference's attention pooling for training the attention: (B, C, h, w) features, (B, h, w)
    attention → (B, C), the mean over locations of the channel-L2-normalised features times the attention."""
    return (F.normalize(features, dim=1) * attention.unsqueeze(1)).mean(dim=(-2, -1))


class DelgOutput(NamedTuple):
    global_embedding: torch.Tensor  # (B, global_dim), L2-normalised
    attention: torch.Tensor  # (B, h, w), computed on block3 or the reconstruction (attention_input)
    attention_pooled: (
        torch.Tensor
    )  # (B, local_channels): attention_pool(block3, attention), for its classifier
    reconstruction: torch.Tensor  # (B, local_channels, h, w)
    local_features: torch.Tensor  # (B, local_channels, h, w) detached block3 features (target)


class LocalAndGlobal(NamedTuple):
    attention: torch.Tensor  # (B, h, w)
    descriptors: torch.Tensor  # (B, local_dim, h, w), L2-normalised over local_dim
    global_descriptor: torch.Tensor | None  # (B, global_dim), L2-normalised; None when not asked for


class Delg(nn.Module):
    def __init__(
        self,
        backbone: str,
        *,
        global_dim: int = 2048,
        whitening: bool = True,
        local_dim: int = 128,
        attention_hidden: int = 512,
        gem_p: float = 3.0,
        gem_learned: bool = False,
        local_head: str = "learned",
        attention_input: str = "block3",
        autoencoder_activation: str = "none",
        global_pool: str = "gem",
        netvlad_clusters: int = 64,
    ) -> None:
        super().__init__()
        if local_head not in LOCAL_HEADS:
            raise ConfigError(f"local_head {local_head!r}; allowed: {list(LOCAL_HEADS)}")
        if global_pool not in GLOBAL_POOLS:
            raise ConfigError(f"global_pool {global_pool!r}; allowed: {list(GLOBAL_POOLS)}")
        if attention_input not in ATTENTION_INPUTS:
            raise ConfigError(f"attention_input {attention_input!r}; allowed: {list(ATTENTION_INPUTS)}")
        spec = get_backbone_spec(backbone)
        pooled = pooled_dim(global_pool, spec.global_channels, netvlad_clusters)
        if not whitening and global_dim != pooled:
            raise ConfigError(f"global_dim {global_dim} without whitening must be {pooled}")
        self.backbone = Backbone(spec)
        self.gem_p = gem_p
        # the released files learned the exponent (gem/gem_power): then it is a weight, gem_p its init
        self.gem_power = nn.Parameter(torch.tensor(float(gem_p))) if gem_learned else None
        self.global_pool = global_pool
        self.netvlad = NetVLAD(spec.global_channels, netvlad_clusters) if global_pool == "netvlad" else None
        self.global_dim = global_dim
        self.whitening = nn.Linear(pooled, global_dim, bias=True) if whitening else None
        self.local_head = local_head
        self.local_dim = local_dim
        self.attention_input = attention_input
        if local_head == "learned":
            slim = spec.tf_layout is not None and spec.tf_layout[0] == "slim"
            self.attention = Attention(spec.local_channels, attention_hidden, slim)
            self.autoencoder = Autoencoder(spec.local_channels, local_dim, slim, autoencoder_activation)
        else:
            # Backbone-only weights (e.g. ImageNet) have no trained local head: score locations by feature
            # norm (the untrained-attention baseline of DELF) and describe them by a fixed projection of the
            # block3 feature. Not persistent: state dicts stay the backbone's.
            projection = orthonormal_projection(spec.local_channels, local_dim)
            self.register_buffer("projection", projection, persistent=False)  # (local_dim, C)

    @classmethod
    def from_config(cls, config: ExtractionConfig) -> Delg:
        return cls(
            config.backbone,
            global_dim=config.global_dim,
            whitening=config.whitening,
            local_dim=config.local_dim,
            attention_hidden=config.attention_hidden,
            gem_p=config.gem_p,
            gem_learned=config.gem_learned,
            local_head=config.local_head,
            attention_input=config.attention_input,
            autoencoder_activation=config.autoencoder_activation,
            global_pool=config.global_pool,
            netvlad_clusters=config.netvlad_clusters,
        )

    def local_receptive_field(self) -> ReceptiveField:
        """Geometry of the local feature map w.r.t. the input image, traced from the backbone."""
        return receptive_field(self.backbone.local_modules())

    def keypoint_field(self) -> ReceptiveField:
        """The field keypoints are placed with: the backbone's declared convention (the reference's
        receptive box) where it has one, else the traced field."""
        return self.backbone.spec.keypoint_field or self.local_receptive_field()

    def pool(self, global_features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) → (B, C) (NetVLAD: (B, K·C)) with the configured global pooling."""
        if self.netvlad is not None:
            return self.netvlad(global_features)
        if self.global_pool == "gem":
            return gem(global_features, self.gem_p if self.gem_power is None else self.gem_power)
        return {"mac": mac, "spoc": spoc, "rmac": rmac}[self.global_pool](global_features)

    def global_head(self, global_features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) block4 features → (B, global_dim): pooling (GeM for DELG) → whitening FC → L2, in
        float32 even under autocast (a descriptor for search, not an activation)."""
        with torch.autocast(global_features.device.type, enabled=False):
            pooled = self.pool(global_features)  # (B, C)
            if self.whitening is not None:
                pooled = self.whitening(pooled)
            return F.normalize(pooled, dim=-1)

    def forward(self, images: torch.Tensor) -> DelgOutput:
        """(B, 3, H, W) normalised images → training outputs. The local head sees block3 through a
        stop-gradient: only the global loss trains the backbone. The attention is computed on block3 or on
        the autoencoder's reconstruction (``attention_input``) and pools the (normalised) block3 features."""
        if self.local_head != "learned":
            raise ConfigError(
                "local_head='backbone' has no trainable local head; train with local_head='learned'"
            )
        block3 = self.backbone.forward_local(images)
        global_embedding = self.global_head(self.backbone.forward_global(block3))
        local_input = block3.detach()
        reconstruction = self.autoencoder.decode(self.autoencoder.encode(local_input))
        attention = self.attention(
            reconstruction if self.attention_input == "reconstruction" else local_input
        )
        pooled = attention_pool(local_input, attention)
        return DelgOutput(global_embedding, attention, pooled, reconstruction, local_input)

    def extract(self, images: torch.Tensor, with_global: bool = True) -> LocalAndGlobal:
        """(B, 3, H, W) normalised images → attention, L2-normalised local descriptors per location, and
        the global descriptor (block4 is skipped when ``with_global`` is False)."""
        block3 = self.backbone.forward_local(images)
        descriptors, attention = self.local_outputs(block3)
        global_descriptor = self.global_head(self.backbone.forward_global(block3)) if with_global else None
        return LocalAndGlobal(attention, descriptors, global_descriptor)

    def local_outputs(self, block3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, h, w) block3 → L2-normalised descriptors (B, local_dim, h, w) and attention (B, h, w)."""
        if self.local_head == "learned":
            codes = self.autoencoder.encode(block3)
            attended = self.autoencoder.decode(codes) if self.attention_input == "reconstruction" else block3
            attention = self.attention(attended).float()
            codes = codes.float()
        else:
            features = block3.float()
            codes = torch.einsum("dc,bchw->bdhw", self.projection, features)
            attention = features.norm(dim=1)
        return F.normalize(codes, dim=1), attention
