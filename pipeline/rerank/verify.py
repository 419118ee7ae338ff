"""Geometric verification of many pairs at once: RANSAC with every hypothesis evaluated as tensors.

Per pair, the matches are normalised (centre and scale rounded to an integer and a power of two, so the
normalisation is identical whatever the padding), hypotheses are fitted in closed form from minimal samples
(3 points: affine; 4 points: homography through the projective basis), and inliers are counted against all
matches with the residual threshold in dst pixels. Sample indices come from one seeded stream of
uniforms shared by every pair (index = floor(u · n) without replacement), so a pair gets the same hypotheses
alone or in any batch: batched results equal one-pair-at-a-time results (up to float rounding inside the
batched matmul that scores hypotheses, which has not changed a count in any test).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.errors import ConfigError
from pipeline.rerank.config import MODELS

MIN_SAMPLES = {"affine": 3, "homography": 4}
MIN_SINE = 1e-2  # sample triangles flatter than ~0.6° are collinear: the hypothesis is skipped


@dataclass(frozen=True)
class Verification:
    """RANSAC result of B pairs; masks are aligned with the input matches."""

    inliers: torch.Tensor  # (B,) int64 inlier count, 0 when no model was found
    inlier_mask: torch.Tensor  # (B, M) bool
    model: torch.Tensor  # (B, 3, 3) float64, maps src pixels to dst pixels; NaN when no model


def _cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """z of the 2-D cross product: (..., 2), (..., 2) → (...)."""
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def _not_collinear(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Whether triangles (a, b, c), each (..., 2), have an angle at a of sine above MIN_SINE."""
    u, v = b - a, c - a
    return _cross(u, v).abs() > MIN_SINE * u.norm(dim=-1) * v.norm(dim=-1)


def _fit_affine(p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine maps from 3 correspondences p → q, each (..., 3, 2): models (..., 3, 3) and validity (...)."""
    p0, q0 = p[..., 0, :], q[..., 0, :]
    u, v = p[..., 1, :] - p0, p[..., 2, :] - p0
    du, dv = q[..., 1, :] - q0, q[..., 2, :] - q0
    ok = _not_collinear(p0, p[..., 1, :], p[..., 2, :]) & _not_collinear(q0, q[..., 1, :], q[..., 2, :])
    det = torch.where(ok, _cross(u, v), torch.ones_like(p0[..., 0]))
    # L = [du dv] · [u v]⁻¹ (2 × 2), t = q0 − L · p0
    a = (du[..., 0] * v[..., 1] - dv[..., 0] * u[..., 1]) / det
    b = (dv[..., 0] * u[..., 0] - du[..., 0] * v[..., 0]) / det
    c = (du[..., 1] * v[..., 1] - dv[..., 1] * u[..., 1]) / det
    d = (dv[..., 1] * u[..., 0] - du[..., 1] * v[..., 0]) / det
    tx = q0[..., 0] - (a * p0[..., 0] + b * p0[..., 1])
    ty = q0[..., 1] - (c * p0[..., 0] + d * p0[..., 1])
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    rows = [torch.stack(r, dim=-1) for r in ((a, b, tx), (c, d, ty), (zero, zero, one))]
    return torch.stack(rows, dim=-2), ok


def _adjugate(m: torch.Tensor) -> torch.Tensor:
    """Adjugate of (..., 3, 3) matrices (det · inverse): columns are cross products of the rows."""
    r0, r1, r2 = m[..., 0, :], m[..., 1, :], m[..., 2, :]
    return torch.stack(
        [torch.linalg.cross(r1, r2), torch.linalg.cross(r2, r0), torch.linalg.cross(r0, r1)], dim=-1
    )


def _homogeneous(p: torch.Tensor) -> torch.Tensor:
    return torch.cat([p, torch.ones_like(p[..., :1])], dim=-1)


def _basis_map(p: torch.Tensor) -> torch.Tensor:
    """(..., 4, 2) points → (..., 3, 3) homography taking e1, e2, e3, (1, 1, 1) to them (up to scale)."""
    ph = _homogeneous(p)  # (..., 4, 3)
    m = ph[..., :3, :].transpose(-1, -2)  # (..., 3, 3), columns p1, p2, p3
    scale = (_adjugate(m) @ ph[..., 3, :, None])[..., 0]  # (..., 3) = det · m⁻¹ p4
    return m * scale[..., None, :]


def _apply(h: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Project points (..., M, 2) by models (..., 3, 3) broadcast over M: x, y, w each (..., M)."""
    x, y = points[..., 0], points[..., 1]
    e = [[h[..., i, j, None] for j in range(3)] for i in range(3)]
    px = e[0][0] * x + e[0][1] * y + e[0][2]
    py = e[1][0] * x + e[1][1] * y + e[1][2]
    w = e[2][0] * x + e[2][1] * y + e[2][2]
    return px, py, w


def _orient(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Flip homographies (..., 3, 3) so the given depths w (...,) become positive."""
    return h * torch.where(w < 0, -1.0, 1.0).to(h.dtype)[..., None, None]


def _fit_homography(p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Homographies from 4 correspondences p → q, each (..., 4, 2): models (..., 3, 3) and validity (...)."""
    triples = ((0, 1, 2), (0, 1, 3), (0, 2, 3), (1, 2, 3))
    ok = torch.ones(p.shape[:-2], dtype=torch.bool, device=p.device)
    for pts in (p, q):
        for i, j, k in triples:
            ok &= _not_collinear(pts[..., i, :], pts[..., j, :], pts[..., k, :])
    h = _basis_map(q) @ _adjugate(_basis_map(p))
    h = h / h.flatten(-2).norm(dim=-1).clamp(min=1e-30)[..., None, None]
    _, _, w = _apply(h, p)  # (..., 4) depths of the samples: one sign for a valid model
    h = _orient(h, w[..., 0])
    ok &= (w * w[..., :1] > 0).all(dim=-1) & torch.isfinite(h).flatten(-2).all(dim=-1)
    return h, ok


_FIT = {"affine": _fit_affine, "homography": _fit_homography}


def _affine_features(src: torch.Tensor, dst: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(b, M, 2) matches → (b, 13, M) monomials whose dot product with _affine_rows is |A·p − q|².

    Padding gets an infinite |q|² term, so it is never an inlier.
    """
    x, y, u, v = src[..., 0], src[..., 1], dst[..., 0], dst[..., 1]
    norm2 = torch.where(valid, u * u + v * v, torch.inf)
    one = torch.ones_like(x)
    return torch.stack([x * x, x * y, y * y, x, y, one, u * x, u * y, u, v * x, v * y, v, norm2], dim=1)


def _affine_rows(h: torch.Tensor) -> torch.Tensor:
    """(b, h, 3, 3) affine models → (b, h, 13) coefficients of |A·p − q|² = pᵀAᵀAp − 2 qᵀAp + |q|²."""
    a = h[..., :2, :]  # (b, h, 2, 3)
    g = a.transpose(-1, -2) @ a  # (b, h, 3, 3) = AᵀA
    quadratic = [
        g[..., 0, 0],
        2 * g[..., 0, 1],
        g[..., 1, 1],
        2 * g[..., 0, 2],
        2 * g[..., 1, 2],
        g[..., 2, 2],
    ]
    return torch.cat(
        [torch.stack(quadratic, dim=-1), -2 * a.flatten(-2), torch.ones_like(g[..., :1, 0])], dim=-1
    )


def _projective_features(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """(b, M, 2) matches → (b, 9, M) rows [x, y, 1, ux, uy, u, vx, vy, v]."""
    x, y, u, v = src[..., 0], src[..., 1], dst[..., 0], dst[..., 1]
    one = torch.ones_like(x)
    return torch.stack([x, y, one, u * x, u * y, u, v * x, v * y, v], dim=1)


def _projective_rows(h: torch.Tensor) -> torch.Tensor:
    """(b, h, 3, 3) → (b, h·3, 9) rows giving r_x = h0·p − u·(h2·p), r_y = h1·p − v·(h2·p) and w = h2·p."""
    h0, h1, h2 = h[..., 0, :], h[..., 1, :], h[..., 2, :]
    zero = torch.zeros_like(h0)
    rows = [
        torch.cat([h0, -h2, zero], dim=-1),
        torch.cat([h1, zero, -h2], dim=-1),
        torch.cat([h2, zero, zero], dim=-1),
    ]
    return torch.stack(rows, dim=2).flatten(1, 2)


def _features(src: torch.Tensor, dst: torch.Tensor, valid: torch.Tensor, projective: bool) -> torch.Tensor:
    return _projective_features(src, dst) if projective else _affine_features(src, dst, valid)


def _inliers(
    h: torch.Tensor, features: torch.Tensor, valid: torch.Tensor, thr2: torch.Tensor, projective: bool
) -> torch.Tensor:
    """Inlier masks (b, h, M) of models h (b, h, 3, 3) on match features (b, F, M) with valid (b, M).

    A match is an inlier when |h(p) − q|² < thr². Affine: one matmul gives the squared error (a quadratic
    form; float32 error ~1e-5 in normalised units, far below thr² at pixel thresholds). Homography:
    r_x² + r_y² < thr² · w² with w > 0.
    """
    if not projective:
        return torch.bmm(_affine_rows(h), features) < thr2[:, None, None]  # (b, h, M)
    b, n_models = h.shape[:2]
    out = torch.bmm(_projective_rows(h), features).reshape(b, n_models, 3, -1)  # (b, h, 3, M)
    w = out[:, :, 2]
    err2 = out[:, :, 0] ** 2 + out[:, :, 1] ** 2
    return valid[:, None, :] & (w > 0) & (err2 < thr2[:, None, None] * w**2)


def _sample(uniforms: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Distinct indices below n for each pair: uniforms (h, k) float64, n (b,) → (b, h, k) int64."""
    picks: list[torch.Tensor] = []
    for j in range(uniforms.shape[1]):
        left = (n[:, None] - j).clamp(min=1)  # (b, 1) indices still free
        r = torch.minimum((uniforms[None, :, j] * left).long(), left - 1)  # (b, h)
        if picks:
            for taken in torch.sort(torch.stack(picks, dim=-1), dim=-1).values.unbind(-1):
                r = r + (r >= taken).long()  # skip indices already taken, smallest first
        picks.append(r)
    return torch.stack(picks, dim=-1)


def _gather_samples(points: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """points (b, M, 2) at index (b, h, k) → (b, h, k, 2)."""
    b, h, k = index.shape
    flat = points.gather(1, index.reshape(b, h * k, 1).expand(-1, -1, 2))
    return flat.reshape(b, h, k, 2)


def _refit_affine(
    src: torch.Tensor, dst: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares affine on the inliers (float64 sums): models (b, 3, 3) and validity (b,)."""
    x = _homogeneous(src.double())  # (b, M, 3)
    w = mask.double()
    xtx = torch.einsum("bmi,bm,bmj->bij", x, w, x)
    xty = torch.einsum("bmi,bm,bmj->bij", x, w, dst.double())  # (b, 3, 2)
    sol, info = torch.linalg.solve_ex(xtx, xty)  # [x y 1] · sol = [u v]
    last = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64, device=src.device).expand(len(sol), 1, 3)
    h = torch.cat([sol.transpose(1, 2), last], dim=1)
    return h, (info == 0) & torch.isfinite(h).flatten(1).all(dim=1)


def _refit_homography(
    src: torch.Tensor, dst: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares DLT on the inliers: the smallest eigenvector of AᵀA (float64): (b, 3, 3), validity (b,)."""
    x, y = src[..., 0].double(), src[..., 1].double()
    u, v = dst[..., 0].double(), dst[..., 1].double()
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    rows_u = torch.stack([x, y, one, zero, zero, zero, -u * x, -u * y, -u], dim=-1)  # (b, M, 9)
    rows_v = torch.stack([zero, zero, zero, x, y, one, -v * x, -v * y, -v], dim=-1)
    w = mask.double()
    ata = torch.einsum("bmi,bm,bmj->bij", rows_u, w, rows_u) + torch.einsum(
        "bmi,bm,bmj->bij", rows_v, w, rows_v
    )
    h = torch.linalg.eigh(ata).eigenvectors[..., 0].reshape(-1, 3, 3)
    _, _, depth = _apply(h[:, None], src.double())  # (b, 1, M)
    h = _orient(h, (depth[:, 0] * w).sum(dim=1))
    return h, torch.isfinite(h).flatten(1).all(dim=1)


_REFIT = {"affine": _refit_affine, "homography": _refit_homography}


def _normaliser(
    points: torch.Tensor, valid: torch.Tensor, n: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair centre (b, 2) rounded to whole pixels and scale (b,) rounded to a power of two.

    Rounding makes the normalisation independent of padding-dependent summation order.
    """
    weight = valid.double()[..., None]
    count = n.clamp(min=1).double()
    centre = ((points.double() * weight).sum(dim=1) / count[:, None]).round()
    spread = ((points.double() - centre[:, None]).norm(dim=-1) * weight[..., 0]).sum(dim=1) / count
    scale = torch.exp2(torch.log2(spread.clamp(min=1.0)).round())
    return centre.to(points.dtype), scale.to(points.dtype)


def _to_pixels(
    h: torch.Tensor,
    src_centre: torch.Tensor,
    src_scale: torch.Tensor,
    dst_centre: torch.Tensor,
    dst_scale: torch.Tensor,
) -> torch.Tensor:
    """Models between normalised coordinates (b, 3, 3) → between pixels (float64), scaled so h[2, 2] = 1."""
    b = len(h)
    to_src = torch.eye(3, dtype=torch.float64, device=h.device).repeat(b, 1, 1)
    to_src[:, :2, :2] /= src_scale.double()[:, None, None]
    to_src[:, :2, 2] = -src_centre.double() / src_scale.double()[:, None]
    from_dst = torch.eye(3, dtype=torch.float64, device=h.device).repeat(b, 1, 1)
    from_dst[:, :2, :2] *= dst_scale.double()[:, None, None]
    from_dst[:, :2, 2] = dst_centre.double()
    pixels = from_dst @ h.double() @ to_src
    corner = pixels[:, 2, 2]
    return torch.where(corner.abs()[:, None, None] > 1e-12, pixels / corner[:, None, None], pixels)


def _ransac(
    src: torch.Tensor,
    dst: torch.Tensor,
    valid: torch.Tensor,
    n: torch.Tensor,
    thr2: torch.Tensor,
    uniforms: torch.Tensor,
    model: str,
    refit: bool,
    max_elements: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RANSAC on normalised matches src, dst (b, M, 2), valid-first: final inlier masks (b, M), models (b, 3, 3).

    Pairs without any valid hypothesis get an all-False mask.
    """
    b, m = valid.shape
    projective = model == "homography"
    best_count = torch.full((b,), -1, dtype=torch.int64, device=src.device)
    best = torch.zeros(b, 3, 3, dtype=src.dtype, device=src.device)
    rows = torch.arange(b, device=src.device)
    features = _features(src, dst, valid, projective)  # (b, F, M)
    step = max(1, max_elements // max(1, b * m))
    for start in range(0, len(uniforms), step):
        index = _sample(uniforms[start : start + step], n)  # (b, h, k)
        h, ok = _FIT[model](_gather_samples(src, index), _gather_samples(dst, index))  # (b, h, 3, 3), (b, h)
        counts = _inliers(h, features, valid, thr2, projective).sum(dim=-1).masked_fill(~ok, -1)  # (b, h)
        top = counts.argmax(dim=1)  # first best: earlier trials win ties
        better = counts[rows, top] > best_count
        best_count = torch.where(better, counts[rows, top], best_count)
        best = torch.where(better[:, None, None], h[rows, top], best)
    mask = _inliers(best[:, None], features, valid, thr2, projective)[:, 0] & (best_count > 0)[:, None]
    if refit:
        refitted, ok = _REFIT[model](src, dst, mask)
        refitted = refitted.to(src.dtype)
        refit_mask = _inliers(refitted[:, None], features, valid, thr2, projective)[:, 0]
        keep = ok & (best_count > 0) & (refit_mask.sum(dim=1) >= mask.sum(dim=1))
        mask = torch.where(keep[:, None], refit_mask, mask)
        best = torch.where(keep[:, None, None], refitted, best)
    return mask, best


def _size_buckets(n: torch.Tensor, k: int) -> list[torch.Tensor]:
    """Pair indices grouped by match count within a factor of two (bounds padding); pairs below k left out."""
    usable = torch.nonzero(n >= k)[:, 0]
    classes = torch.log2(n[usable].double()).floor().long()
    return [usable[classes == c] for c in torch.unique(classes)]


def verify(
    src: torch.Tensor,
    dst: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    model: str = "affine",
    threshold: float = 20.0,
    trials: int = 1000,
    seed: int = 0,
    refit: bool = True,
    max_elements: int = 1 << 22,
) -> Verification:
    """RANSAC over B pairs of matches at once.

    src, dst: (B, M, 2) matched keypoints in pixels (the model maps src to dst); valid: (B, M) bool (padding False).
    Each pair gets ``trials`` minimal-sample hypotheses (``model`` "affine": 3 points, "homography": 4);
    degenerate samples (collinear points) are skipped; a match is an inlier when the model maps it within
    ``threshold`` pixels of its dst keypoint. The best hypothesis (earliest on ties) is optionally
    refitted by least squares on its inliers, kept when it loses none. Hypotheses are evaluated in chunks of
    at most about ``max_elements`` pair × trial × match values.
    """
    src, dst, valid = _checked(src, dst, valid, model, threshold, trials)
    batch, width = valid.shape
    k = MIN_SAMPLES[model]
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)  # (B, M) valid matches first
    src, dst, valid = (
        src.gather(1, order[..., None].expand(-1, -1, 2)),
        dst.gather(1, order[..., None].expand(-1, -1, 2)),
        valid.gather(1, order),
    )
    n = valid.sum(dim=1)  # (B,)
    src_n, src_centre, src_scale = _normalised(src, valid, n)
    dst_n, dst_centre, dst_scale = _normalised(dst, valid, n)
    thr2 = (threshold / dst_scale) ** 2  # (B,) threshold in normalised dst units
    uniforms = _uniforms(trials, k, seed, src.device)

    sorted_mask = torch.zeros(batch, width, dtype=torch.bool, device=src.device)
    models = torch.full((batch, 3, 3), torch.nan, dtype=torch.float64, device=src.device)
    for pairs in _size_buckets(n, k):
        m = int(n[pairs].max())
        step = max(1, max_elements // (m * min(trials, 64)))  # keep at least 64 trials per tensor
        for chunk in pairs.split(step):
            mask, h = _ransac(
                src_n[chunk, :m],
                dst_n[chunk, :m],
                valid[chunk, :m],
                n[chunk],
                thr2[chunk],
                uniforms,
                model,
                refit,
                max_elements,
            )
            sorted_mask[chunk, :m] = mask
            found = mask.any(dim=1)
            pixels = _to_pixels(h, src_centre[chunk], src_scale[chunk], dst_centre[chunk], dst_scale[chunk])
            models[chunk] = torch.where(found[:, None, None], pixels, models[chunk])
    inlier_mask = torch.zeros_like(sorted_mask).scatter(1, order, sorted_mask)
    return Verification(inliers=inlier_mask.sum(dim=1), inlier_mask=inlier_mask, model=models)


def _uniforms(trials: int, k: int, seed: int, device: torch.device) -> torch.Tensor:
    """(trials, k) float64 uniforms shared by all pairs, drawn on the CPU: the same samples on any device."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(trials, k, generator=generator, dtype=torch.float64).to(device)


def _normalised(
    points: torch.Tensor, valid: torch.Tensor, n: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, M, 2) points moved to their valid points' centre (B, 2) and divided by their scale (B,)."""
    centre, scale = _normaliser(points, valid, n)
    return (points - centre[:, None]) / scale[:, None, None], centre, scale


def _checked(
    src: torch.Tensor,
    dst: torch.Tensor,
    valid: torch.Tensor | None,
    model: str,
    threshold: float,
    trials: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """verify's inputs validated: float32 src/dst on src's device with padding zeroed, valid a bool mask."""
    if model not in MODELS:
        raise ConfigError(f"model={model!r}: allowed {MODELS}")
    if src.ndim != 3 or src.shape[2] != 2 or dst.shape != src.shape:
        raise ValueError(f"src {tuple(src.shape)} and dst {tuple(dst.shape)} must both be (B, M, 2)")
    if valid is None:
        valid = torch.ones(src.shape[:2], dtype=torch.bool, device=src.device)
    if valid.shape != src.shape[:2]:
        raise ValueError(f"valid has shape {tuple(valid.shape)}; expected {tuple(src.shape[:2])}")
    if not threshold > 0:
        raise ConfigError(f"threshold={threshold}: must be > 0 pixels")
    if trials < 1:
        raise ConfigError(f"trials={trials}: must be >= 1")
    valid = valid.to(device=src.device, dtype=torch.bool)
    if not torch.isfinite(src[valid]).all() or not torch.isfinite(dst[valid]).all():
        raise ValueError("src/dst hold non-finite coordinates at valid matches; expected finite pixels")
    # padding may hold anything (inf, NaN): zero it so no arithmetic sees it
    src = torch.where(valid[..., None], src.float(), 0.0)
    dst = torch.where(valid[..., None], dst.to(device=src.device, dtype=torch.float32), 0.0)
    return src, dst, valid
