"""Putative matches for many (query, candidate) pairs at once: nearest neighbour on padded, masked batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class Matches:
    """Padded matches of B pairs; the valid ones come first, in query-feature order."""

    query_idx: torch.Tensor  # (B, M) int64, index into the query's features
    cand_idx: torch.Tensor  # (B, M) int64, index into the candidate's features
    valid: torch.Tensor  # (B, M) bool

    @property
    def counts(self) -> torch.Tensor:
        """(B,) int64 number of matches per pair."""
        return self.valid.sum(dim=1)


def pad(
    arrays: Sequence[np.ndarray | torch.Tensor], device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack arrays of shape (N_i, C) into a zero-padded (B, N_max, C) float32 tensor and its (B, N_max) mask."""
    if not arrays:
        raise ValueError("pad: got no arrays; need at least one (N, C) array")
    tensors = [torch.as_tensor(a).float().to(device) for a in arrays]
    widths = {t.shape[1:] for t in tensors}
    if len(widths) != 1 or any(t.ndim != 2 for t in tensors):
        raise ValueError(
            f"pad: arrays must all be (N, C) with one C; got shapes {[tuple(t.shape) for t in tensors]}"
        )
    lengths = torch.tensor([len(t) for t in tensors], device=tensors[0].device)
    batch = torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True)  # (B, N_max, C)
    mask = torch.arange(batch.shape[1], device=batch.device)[None, :] < lengths[:, None]  # (B, N_max)
    return batch, mask


def _check_batch(name: str, desc: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if desc.ndim != 3:
        raise ValueError(f"{name} has shape {tuple(desc.shape)}; expected (B, N, D)")
    if mask is None:
        return torch.ones(desc.shape[:2], dtype=torch.bool, device=desc.device)
    if mask.shape != desc.shape[:2]:
        raise ValueError(f"{name} mask has shape {tuple(mask.shape)}; expected {tuple(desc.shape[:2])}")
    return mask.to(device=desc.device, dtype=torch.bool)


def _distance(similarity: torch.Tensor) -> torch.Tensor:
    """L2 distance of unit vectors from their inner product (−inf → inf)."""
    return torch.sqrt(torch.clamp(2 - 2 * similarity, min=0))


def _nearest(
    query: torch.Tensor,
    cand: torch.Tensor,
    query_mask: torch.Tensor,
    cand_mask: torch.Tensor,
    max_distance: float,
    ratio: float | None,
    mutual: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest candidate feature of each query feature and whether it is kept: (b, Nq) int64, (b, Nq) bool."""
    # padding columns get −inf through the GEMM's bias term (no extra pass over the block)
    bias = torch.zeros(cand_mask.shape, dtype=cand.dtype, device=cand.device).masked_fill_(
        ~cand_mask, -torch.inf
    )
    query = query.expand(len(cand), -1, -1)
    sim = torch.baddbmm(bias[:, None, :], query, cand.transpose(1, 2))  # (b, Nq, Nc); d² = 2 − 2·sim
    if sim.shape[2] == 0:  # no candidate features at all
        return torch.zeros(sim.shape[:2], dtype=torch.int64, device=sim.device), torch.zeros_like(query_mask)
    if ratio is None:
        best, nearest = sim.max(dim=2)  # (b, Nq)
        keep = query_mask & (_distance(best) < max_distance)
    else:
        top, top_idx = sim.topk(min(2, sim.shape[2]), dim=2)  # (b, Nq, k)
        dist = _distance(top)
        nearest = top_idx[..., 0]
        keep = query_mask & (dist[..., 0] < max_distance)
        if top.shape[2] == 2:
            keep &= dist[..., 0] < ratio * dist[..., 1]
    if mutual:
        back = sim.masked_fill_(~query_mask[:, :, None], -torch.inf).argmax(dim=1)  # (b, Nc)
        own = torch.arange(sim.shape[1], device=sim.device)[None, :]
        keep &= back.gather(1, nearest) == own
    return nearest, keep


def _compact(nearest: torch.Tensor, keep: torch.Tensor) -> Matches:
    """Move kept matches to the front (stable, so in query-feature order) and drop all-padding columns."""
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # (B, Nq)
    width = int(keep.sum(dim=1).max()) if keep.numel() else 0
    order = order[:, :width]
    return Matches(query_idx=order, cand_idx=nearest.gather(1, order), valid=keep.gather(1, order))


def match(
    query_desc: torch.Tensor,
    cand_desc: torch.Tensor,
    *,
    query_mask: torch.Tensor | None = None,
    cand_mask: torch.Tensor | None = None,
    max_distance: float = 1.0,
    ratio: float | None = None,
    mutual: bool = False,
    max_elements: int = 1 << 22,
) -> Matches:
    """Putative matches between a query and B candidates (or B queries and B candidates).

    query_desc: (Nq, D) shared by all pairs, or (B, Nq, D); cand_desc: (B, Nc, D). Descriptors are
    L2-normalised; masks (same leading shape, True = real feature) mark padding. Each query feature keeps its
    nearest candidate feature when their L2 distance is below ``max_distance``, and optionally passes the Lowe
    ratio test (``ratio``) and the mutual nearest-neighbour check. Pairs are processed in chunks so that a
    similarity block holds at most about ``max_elements`` values.
    """
    if query_desc.ndim == 2:
        query_desc = query_desc[None]
        query_mask = None if query_mask is None else query_mask[None]
    query_mask = _check_batch("query_desc", query_desc, query_mask)
    cand_mask = _check_batch("cand_desc", cand_desc, cand_mask)
    if query_desc.shape[0] not in (1, cand_desc.shape[0]) or query_desc.shape[2] != cand_desc.shape[2]:
        raise ValueError(
            f"query_desc {tuple(query_desc.shape)} does not pair with cand_desc {tuple(cand_desc.shape)}: "
            "need (1 or B, Nq, D) against (B, Nc, D)"
        )
    if not max_distance > 0:
        raise ConfigError(f"max_distance={max_distance}: must be > 0")
    if ratio is not None and not 0 < ratio <= 1:
        raise ConfigError(f"ratio={ratio}: must be in (0, 1] or None")
    batch, n_query = cand_desc.shape[0], query_desc.shape[1]
    query_desc = query_desc.to(cand_desc.device)
    query_mask = query_mask.to(cand_desc.device)
    step = max(1, max_elements // max(1, n_query * cand_desc.shape[1]))
    nearest, keep = [], []
    for start in range(0, batch, step):
        stop = min(batch, start + step)
        shared = query_desc.shape[0] == 1
        q = query_desc if shared else query_desc[start:stop]
        qm = query_mask.expand(stop - start, -1) if shared else query_mask[start:stop]
        n, k = _nearest(q, cand_desc[start:stop], qm, cand_mask[start:stop], max_distance, ratio, mutual)
        nearest.append(n)
        keep.append(k)
    if not nearest:
        empty = torch.zeros(0, n_query, dtype=torch.int64, device=cand_desc.device)
        return _compact(empty, empty.bool())
    return _compact(torch.cat(nearest), torch.cat(keep))


def gather_points(points: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """points (B or 1, N, 2) gathered at index (B, M) → (B, M, 2)."""
    points = points.expand(index.shape[0], -1, -1)
    return points.gather(1, index[..., None].expand(-1, -1, points.shape[2]))
