"""The model being trained (DELG plus its training-only classifiers) and one optimisation step."""

from __future__ import annotations

import torch
from torch import nn

from pipeline import storage
from pipeline.errors import ConfigError
from pipeline.model import Delg, load_pretrained
from pipeline.model.losses import (
    ArcFace,
    MarginLoss,
    contrastive_loss,
    mine_negatives,
    pairwise_distances,
    quadruplet_loss,
    reconstruction_error,
    triplet_loss,
)
from pipeline.train.settings import TrainConfig, TrainJob


class Trainee(nn.Module):
    """DELG plus its training-only classifiers; ``forward`` returns per-image loss terms (unreduced,
    so each worker's share of the global batch can be weighted by its image count)."""

    def __init__(self, model: Delg, num_classes: int, config: TrainConfig) -> None:
        super().__init__()
        self.model = model
        self.config = config
        terms = config.terms()
        self.arcface = (
            ArcFace(model.global_dim, num_classes, config.global_margin, config.arcface_scale)
            if "global" in terms and config.objective == "arcface"
            else None
        )
        self.margin_loss = (
            MarginLoss(num_classes, config.global_margin, config.margin_beta, config.margin_beta_per_class)
            if "global" in terms and config.objective == "margin"
            else None
        )
        local_channels = model.backbone.spec.local_channels
        self.attention_classifier = nn.Linear(local_channels, num_classes) if "attention" in terms else None

    def forward(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator,
        views: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """(B, 3, S, S) images, (B,) labels, (B,) view keys (quadruplet) → {term: (B,)} for the config's
        terms."""
        out = self.model(images)
        terms = {}
        if self.arcface is not None:
            terms["global"] = self.arcface(out.global_embedding, labels)
        elif "global" in self.config.terms():
            terms["global"] = self._metric_loss(out.global_embedding, labels, generator, views)
        if self.attention_classifier is not None:
            logits = self.attention_classifier(out.attention_pooled)
            terms["attention"] = nn.functional.cross_entropy(logits, labels, reduction="none")
            terms["reconstruction"] = reconstruction_error(out.reconstruction, out.local_features)
        return terms

    def _metric_loss(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator,
        views: torch.Tensor | None,
    ) -> torch.Tensor:
        distances = pairwise_distances(embeddings)
        negatives = mine_negatives(distances, labels, self.config.mining, embeddings.shape[1], generator)
        margin, objective = self.config.global_margin, self.config.objective
        if self.margin_loss is not None:
            return self.margin_loss(distances, labels, negatives)
        if objective == "quadruplet":
            return quadruplet_loss(distances, labels, negatives, margin, views)
        loss = contrastive_loss if objective == "contrastive" else triplet_loss
        return loss(distances, labels, negatives, margin)

    def trainable_modules(self) -> list[nn.Module]:
        model, which = self.model, self.config.trainable
        if which == "all":
            return [self]
        if which == "local-head":
            return [model.attention, model.autoencoder, self.attention_classifier]
        if model.whitening is None:
            raise ConfigError("trainable='global-head' needs a preset with a whitening layer to fine-tune")
        return [m for m in (model.whitening, self.arcface, self.margin_loss) if m is not None]

    def weighted_loss(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B,) total loss per image: global + attention_weight · attention + reconstruction_weight · recon."""
        weights = {
            "global": 1.0,
            "attention": self.config.attention_weight,
            "reconstruction": self.config.reconstruction_weight,
        }
        return sum(weights[name] * value for name, value in terms.items())


def build_trainee(job: TrainJob, num_classes: int, options: storage.Options = None) -> Trainee:
    """The seeded initial model (identical in every worker), loaded from ``job.weights_url`` when given,
    with only the config's trainable parts requiring gradients."""
    torch.manual_seed(job.config.seed)
    model = Delg.from_config(job.model_config())
    if job.weights_url:
        load_pretrained(model, job.weights_url, options)
    trainee = Trainee(model, num_classes, job.config)
    trainee.requires_grad_(False)
    for module in trainee.trainable_modules():
        module.requires_grad_(True)
    return trainee


def set_train_mode(trainee: Trainee) -> None:
    """Train mode, except BatchNorm layers that must keep their statistics: all of them with
    batchnorm='frozen', else those whose parameters are frozen (a frozen backbone stays bit-identical)."""
    trainee.train()
    for module in trainee.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            frozen = not any(p.requires_grad for p in module.parameters())
            if frozen or trainee.config.batchnorm == "frozen":
                module.eval()


def learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    """The reference's linear decay: lr · (1 − step / total)."""
    return config.lr * (1.0 - step / total_steps)


def train_step(
    trainee: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    lr: float,
    share: float,
    generator: torch.Generator,
    views: torch.Tensor | None = None,
) -> dict[str, float]:
    """One SGD step on this worker's images. ``share`` = workers / images in the global batch: data-
    parallel averaging over workers then gives the mean over the global batch's images, even when
    workers dropped different numbers of bad rows. Returns this worker's per-term sums (for logging)."""
    core = trainee.module if isinstance(trainee, nn.parallel.DistributedDataParallel) else trainee
    terms = trainee(images, labels, generator, views)
    total = core.weighted_loss(terms)
    optimizer.zero_grad(set_to_none=True)
    (total.sum() * share).backward()
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    nn.utils.clip_grad_norm_(parameters, core.config.clip_norm)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    sums = {name: value.detach().sum().item() for name, value in terms.items()}
    return {**sums, "loss": total.detach().sum().item()}
