"""Learned PCA whitening of global descriptors: an index option, fitted on the index's training sample.

Whitening (Jégou & Chum, ECCV 2012) centres a descriptor, projects it on the sample's top-``d`` principal
axes, divides each axis by the square root of its variance and L2-normalises the result: correlated components
(repeated structures, shared backgrounds) stop dominating inner products. It is fitted on the descriptors of
the collection itself (no labels), stored with the index (``whitening.npz``, owned here) and applied to every
vector the index sees: the added descriptors, their refinement codes, the exact search that measures recall,
the queries, and the global re-ranking's vectors. Search scores are then inner products in the whitened space.
"""

from __future__ import annotations

import io as _bytes_io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.errors import ConfigError, InputError
from pipeline.storage import Options

FILE = "whitening.npz"
MIN_EIGENVALUE = 1e-6  # relative to the largest: axes below it are noise, whitening would blow them up

Space = Callable[[np.ndarray], np.ndarray]  # (n, D) store vectors → (n, d) index vectors


@dataclass(frozen=True)
class Whitening:
    """y = normalise((x − mean) · projection); projection columns are principal axes scaled by λ^−1/2."""

    mean: np.ndarray  # (D,) float32
    projection: np.ndarray  # (D, d) float32

    @property
    def dim(self) -> int:
        return int(self.projection.shape[1])

    @property
    def input_dim(self) -> int:
        return int(self.projection.shape[0])

    def __call__(self, vectors: np.ndarray) -> np.ndarray:
        """(n, D) → (n, d) float32, L2-normalised (a zero row stays zero)."""
        if vectors.ndim != 2 or vectors.shape[1] != self.input_dim:
            raise InputError(f"whitening expects (n, {self.input_dim}) vectors, got {vectors.shape}")
        out = (np.asarray(vectors, np.float32) - self.mean) @ self.projection
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return np.ascontiguousarray(out / np.maximum(norms, 1e-12), dtype=np.float32)


def fit(sample: np.ndarray, dim: int, power: float = 0.5) -> Whitening:
    """PCA whitening to ``dim`` dims from ``sample`` (n, D): needs n > dim and ``dim`` ≤ D.

    Each principal axis is divided by its eigenvalue to the ``power``: 0.5 whitens fully (unit variance), 0
    only rotates and reduces (PCA), values between shrink the whitening — the safer choice when the sample is
    small or unlike the queries, as small-variance axes are then mostly noise (benchmarks/RESULTS.md).

    Covariance and eigenvectors in float64 (a float32 eigensolve of a 2048² matrix loses the small axes).
    """
    n, input_dim = sample.shape
    if not 0 < dim <= input_dim:
        raise ConfigError(f"whitening to {dim} dims: must be in [1, {input_dim}] (the descriptor dimension)")
    if not 0 <= power <= 1:
        raise ConfigError(f"whitening power {power}: must be in [0, 1] (0.5: full whitening, 0: PCA only)")
    if n <= dim:
        raise ConfigError(f"whitening to {dim} dims needs more than {dim} training vectors, got {n}")
    data = sample.astype(np.float64)
    mean = data.mean(axis=0)
    centred = data - mean
    eigenvalues, eigenvectors = np.linalg.eigh(centred.T @ centred / n)  # ascending
    order = np.argsort(eigenvalues)[::-1][:dim]
    kept = eigenvalues[order]
    if kept[-1] <= MIN_EIGENVALUE * kept[0]:
        rank = int((kept > MIN_EIGENVALUE * kept[0]).sum())
        raise ConfigError(f"whitening to {dim} dims: the training sample spans only {rank} dims")
    projection = eigenvectors[:, order] / kept**power
    return Whitening(mean.astype(np.float32), projection.astype(np.float32))


def to_bytes(whitening: Whitening) -> bytes:
    buffer = _bytes_io.BytesIO()
    np.savez(buffer, mean=whitening.mean, projection=whitening.projection)
    return buffer.getvalue()


def from_bytes(data: bytes, where: str) -> Whitening:
    """The whitening stored in ``data``; a malformed file is a ValueError naming ``where``."""
    try:
        with np.load(_bytes_io.BytesIO(data), allow_pickle=False) as arrays:
            mean, projection = arrays["mean"], arrays["projection"]
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{where}: not a whitening file ({exc})") from None
    if mean.ndim != 1 or projection.ndim != 2 or projection.shape[0] != mean.shape[0]:
        raise InputError(f"{where}: whitening shapes {mean.shape}, {projection.shape} do not fit together")
    return Whitening(mean.astype(np.float32), projection.astype(np.float32))


def write(index_url: str, whitening: Whitening, options: Options = None) -> None:
    storage.write_bytes(storage.join(index_url, FILE), to_bytes(whitening), options)


def remove(index_url: str, options: Options = None) -> None:
    """A rebuild without whitening must not leave a stale whitening file beside the new index."""
    url = storage.join(index_url, FILE)
    if storage.exists(url, options):
        storage.remove(url, options)


def identity(vectors: np.ndarray) -> np.ndarray:
    return vectors


def load(index_url: str, options: Options = None) -> Whitening:
    """The whitening stored beside the index at ``index_url`` (a missing or malformed file is a clear error)."""
    url = storage.join(index_url, FILE)
    if not storage.exists(url, options):
        raise InputError(f"{storage.redact(url)} is missing: the index was built with whitening")
    return from_bytes(storage.read_bytes(url, options), storage.redact(url))


def space(index_url: str, params: dict[str, Any], options: Options = None) -> Space:
    """The map from store vectors to the vectors of the built index at ``index_url`` (its params.json
    ``params``): its whitening, or the identity."""
    if not params.get("whitening"):
        return identity
    whitening = load(index_url, options)
    if whitening.dim != params["dim"]:
        raise InputError(
            f"the whitening of {storage.redact(index_url)} gives {whitening.dim} dims, the index has {params['dim']}"
        )
    return whitening


def input_dim(params: dict[str, Any]) -> int:
    """The dimension of the store vectors the index takes (its own dimension unless it whitens)."""
    return int(params.get("input_dim", params["dim"]))
