"""Global re-ranking (α-QE, DBA, SuperGlobal): hand-computed examples, batched = per query, bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import results
from pipeline.index import io
from pipeline.index.dba import compute_dba, read_dba, write_dba
from pipeline.rerank import RerankConfig, rerank
from pipeline.rerank.global_rerank import (
    GlobalRerankConfig,
    alpha_qe_scores,
    database_augmentation,
    parse_method,
    refined_order,
    refined_scores,
    superglobal_scores,
)

# Three unit vectors in the plane used by the hand-computed examples.
A, B, C = (1.0, 0.0), (0.6, 0.8), (0.0, 1.0)


def tensor(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_alpha_qe_hand_computed() -> None:
    # q = (1, 0); candidates x1 = (0.6, 0.8) sim 0.6, x2 = (0, 1) sim 0, x3 = (0.8, -0.6) sim 0.8, x4 padding.
    # k = 2, α = 3: the top two are x3 (weight 0.8³ = 0.512) and x1 (0.6³ = 0.216):
    # q' ∝ (1, 0) + 0.512 (0.8, -0.6) + 0.216 (0.6, 0.8) = (1.5392, -0.1344), |q'|² = 2.3872.
    cands = tensor([[B, C, (0.8, -0.6), (0.0, 0.0)]])
    valid = torch.tensor([[True, True, True, False]])
    scores = alpha_qe_scores(tensor([A]), cands, valid, k=2, alpha=3.0)[0]
    norm = math.sqrt(2.3872)
    expected = [(1.5392 * 0.6 - 0.1344 * 0.8) / norm, -0.1344 / norm, (1.5392 * 0.8 + 0.1344 * 0.6) / norm]
    np.testing.assert_allclose(scores[:3].numpy(), expected, rtol=1e-12)
    assert scores[3] == float("-inf")


def test_alpha_qe_alpha_zero_is_average_qe() -> None:
    # α = 0: plain average of q and its top k = 1 neighbour x1 = (0.6, 0.8): q' ∝ (1.6, 0.8).
    scores = alpha_qe_scores(tensor([A]), tensor([[B, C]]), torch.tensor([[True, True]]), k=1, alpha=0.0)
    norm = math.sqrt(1.6**2 + 0.8**2)
    np.testing.assert_allclose(scores[0].numpy(), [(0.96 + 0.64) / norm, 0.8 / norm], rtol=1e-12)


def test_database_augmentation_hand_computed() -> None:
    # k = 1, α = 1. a's nearest other row is b (0.6): a' ∝ (1, 0) + 0.6 (0.6, 0.8) = (1.36, 0.48);
    # b's is c (0.8): b' ∝ (0.6, 0.8) + 0.8 (0, 1) = (0.6, 1.6); c's is b (0.8): c' ∝ (0.48, 1.64).
    refined = database_augmentation(tensor([A, B, C]), k=1, alpha=1.0, chunk=2)  # chunked: 2 + 1 rows
    expected = np.array([[1.36, 0.48], [0.6, 1.6], [0.48, 1.64]])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(refined.numpy(), expected, rtol=1e-12)


def test_superglobal_hand_computed() -> None:
    # K = 1, β = 0.5; q = (1, 0); shortlist a, b, c (+ one padding entry).
    # Refined (self weight 1, best other neighbour weight β·sim):
    #   a' = (a + 0.3 b) / 1.3 = (1.18, 0.24) / 1.3;  b' = (b + 0.4 c) / 1.4 = (0.6, 1.2) / 1.4;
    #   c' = (c + 0.4 b) / 1.4 = (0.24, 1.32) / 1.4.
    # First scores q·d': 1.18/1.3, 0.6/1.4, 0.24/1.4. The K + 1 = 2 best are a', b':
    #   q' = max(a', b') = (1.18/1.3, 1.2/1.4). Final = (q·d' + q'·d') / 2.
    cands = tensor([[A, B, C, (0.0, 0.0)]])
    valid = torch.tensor([[True, True, True, False]])
    scores = superglobal_scores(tensor([A]), cands, valid, k=1, beta=0.5)[0].numpy()
    refined = np.array([[1.18 / 1.3, 0.24 / 1.3], [0.6 / 1.4, 1.2 / 1.4], [0.24 / 1.4, 1.32 / 1.4]])
    first = refined[:, 0]
    expanded = np.array([1.18 / 1.3, 1.2 / 1.4])
    np.testing.assert_allclose(scores[:3], (first + refined @ expanded) / 2, rtol=1e-12)
    np.testing.assert_allclose(scores[:3], [0.944920, 0.776138, 0.567598], atol=1e-6)  # by hand, 6 places
    assert scores[3] == float("-inf")


def random_batch(
    seed: int, lengths: list[int], dim: int = 8
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    c = max(lengths)
    queries = torch.nn.functional.normalize(torch.randn(len(lengths), dim, generator=gen), dim=-1)
    cands = torch.nn.functional.normalize(torch.randn(len(lengths), c, dim, generator=gen), dim=-1)
    valid = torch.arange(c)[None, :] < torch.tensor(lengths)[:, None]
    return queries, cands * valid[..., None], valid


@pytest.mark.parametrize("refinement", ["qe", "dba", "dba+qe", "superglobal"])
def test_batched_equals_one_query_at_a_time(refinement: str) -> None:
    config = GlobalRerankConfig(qe_k=3, sg_m=6, sg_k=2)
    lengths = [9, 4, 1, 7]
    queries, cands, valid = random_batch(0, lengths)
    batched = refined_scores(refinement, queries, cands, valid, config)
    for b, n in enumerate(lengths):
        alone = refined_scores(
            refinement, queries[b : b + 1], cands[b : b + 1, :n], valid[b : b + 1, :n], config
        )
        torch.testing.assert_close(batched[b, :n], alone[0], rtol=1e-6, atol=1e-6)
        assert torch.isinf(batched[b, n:]).all()
    if refinement == "superglobal":  # beyond sg_m: not refined
        assert torch.isinf(batched[:, 6:]).all()


def test_database_augmentation_chunking_and_device_agnostic() -> None:
    gen = torch.Generator().manual_seed(1)
    vectors = torch.nn.functional.normalize(torch.randn(50, 16, generator=gen), dim=-1)
    whole = database_augmentation(vectors, k=5, chunk=4096)
    torch.testing.assert_close(database_augmentation(vectors, k=5, chunk=7), whole)
    if torch.cuda.is_available():
        torch.testing.assert_close(
            database_augmentation(vectors.cuda(), k=5).cpu(), whole, rtol=1e-4, atol=1e-5
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("refinement", ["qe", "superglobal"])
def test_cuda_matches_cpu(refinement: str) -> None:
    queries, cands, valid = random_batch(2, [9, 4, 7])
    cpu = refined_scores(refinement, queries, cands, valid)
    gpu = refined_scores(refinement, queries.cuda(), cands.cuda(), valid.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-5)


def test_refined_order_puts_refined_first_and_scores_non_increasing() -> None:
    refined = np.array([0.2, 1.6, -np.inf, 0.8, -np.inf])  # SuperGlobal may exceed 1: scaled by 1.6
    order, scores = refined_order(refined, np.array([0.9, 0.8, 0.7, 0.6, 0.1]))
    assert order.tolist() == [1, 3, 0, 2, 4]
    np.testing.assert_allclose(scores, [1.0, 0.5, 0.125, 0.125, 0.1])


def test_parse_method() -> None:
    assert parse_method("verify") == (None, True)
    assert parse_method("superglobal") == ("superglobal", False)
    assert parse_method("dba+qe+verify") == ("dba+qe", True)
    with pytest.raises(ValueError, match="allowed"):
        parse_method("qe+dba")


@pytest.mark.parametrize(
    "bad", [{"qe_k": 0}, {"dba_k": 0}, {"sg_m": 0}, {"sg_k": 0}, {"qe_alpha": -1}, {"sg_beta": 0}]
)
def test_config_rejects_bad_values(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        GlobalRerankConfig(**bad)


def test_bad_shapes_rejected() -> None:
    queries, cands, valid = random_batch(3, [3, 2])
    with pytest.raises(ValueError, match="must be"):
        alpha_qe_scores(queries, cands[:1], valid[:1])
    with pytest.raises(ValueError, match="bool"):
        superglobal_scores(queries, cands, valid.int())
    with pytest.raises(ValueError, match="allowed"):
        refined_scores("diffusion", queries, cands, valid)


# ---------------------------------------------------------------- the stage


def write_store(url: str, ids: list[str], vectors: np.ndarray, rng: np.random.Generator) -> None:
    from pipeline import store

    ones = np.ones(40, np.float32)
    local = []
    for _ in ids:
        desc = rng.normal(size=(40, 8)).astype(np.float32)
        kp = rng.uniform(0, 400, size=(40, 2)).astype(np.float32)
        local.append(store.LocalFeatures(kp, ones, ones, desc / np.linalg.norm(desc, axis=1, keepdims=True)))
    store.write_shard(url, 0, ids, vectors.astype(np.float32), local)


@pytest.fixture
def stage_inputs(tmp_path: Path) -> dict:
    """Two queries, 8 index images with 6-d global vectors, each query's shortlist = all 8 by similarity."""
    rng = np.random.default_rng(5)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    queries, index = unit(rng.normal(size=(2, 6))), unit(rng.normal(size=(8, 6)))
    index_ids = [f"i{c}" for c in range(8)]
    write_store(str(tmp_path / "q"), ["q0", "q1"], queries, rng)
    write_store(str(tmp_path / "i"), index_ids, index, rng)
    rows = []
    for q in range(2):
        sims = index @ queries[q]
        for rank, c in enumerate(np.argsort(-sims)):
            rows.append((f"q{q}", rank + 1, index_ids[c], float(sims[c])))
    pq.write_table(
        pa.table(
            {
                "query_id": [r[0] for r in rows],
                "rank": pa.array([r[1] for r in rows], pa.int32()),
                "id": [r[2] for r in rows],
                "score": pa.array([r[3] for r in rows], pa.float32()),
            }
        ),
        tmp_path / "search.parquet",
    )
    write_dba(str(tmp_path / "index"), compute_dba(index_ids, index.astype(np.float32), k=2))
    io.write_params(str(tmp_path / "index"), {"dim": 6})  # an index without whitening
    return {"tmp": tmp_path, "queries": queries, "index": index, "ids": index_ids, "rows": rows}


def run_stage(inputs: dict, method: str, config: RerankConfig = RerankConfig(device="cpu")) -> pa.Table:
    tmp = inputs["tmp"]
    out = str(tmp / f"{method}.parquet")
    summary = rerank(
        str(tmp / "search.parquet"),
        str(tmp / "q"),
        str(tmp / "i"),
        out,
        config,
        method=method,
        global_config=GlobalRerankConfig(qe_k=3, sg_k=2),
        index_url=str(tmp / "index"),
    )
    assert summary.method == method
    return pq.read_table(out)


@pytest.mark.parametrize("refinement", ["qe", "dba", "dba+qe", "superglobal"])
def test_stage_refinement_alone(stage_inputs: dict, refinement: str) -> None:
    out = run_stage(stage_inputs, refinement)
    meta = out.schema.metadata
    assert meta[b"rerank_method"] == refinement.encode()
    assert json.loads(meta[b"global_rerank_config"])["qe_k"] == 3
    dba = read_dba(str(stage_inputs["tmp"] / "index"))
    index = dba.refined if refinement.startswith("dba") else stage_inputs["index"]
    config = GlobalRerankConfig(qe_k=3, sg_k=2)
    for q in range(2):
        shortlist = [r for r in stage_inputs["rows"] if r[0] == f"q{q}"]
        rows = [stage_inputs["ids"].index(r[2]) for r in shortlist]
        scores = refined_scores(
            refinement,
            torch.as_tensor(stage_inputs["queries"][q : q + 1], dtype=torch.float32),
            torch.as_tensor(index[rows][None], dtype=torch.float32),
            torch.ones(1, len(rows), dtype=torch.bool),
            config,
        )[0].numpy()
        part = out.filter(pc.equal(out["query_id"], f"q{q}")).to_pydict()
        assert part["id"] == [shortlist[i][2] for i in np.argsort(-scores, kind="stable")]
        assert part["inliers"] == [-1] * 8
        by_id = {r[2]: r[3] for r in shortlist}
        np.testing.assert_allclose(part["global_score"], [by_id[i] for i in part["id"]], rtol=1e-6)


def test_stage_refinement_then_verification(stage_inputs: dict) -> None:
    config = RerankConfig(device="cpu", top=3, trials=50)
    refined_only = run_stage(stage_inputs, "superglobal")
    combined = run_stage(stage_inputs, "superglobal+verify", config)
    assert combined.schema.metadata[b"rerank_method"] == b"superglobal+verify"
    for q in ("q0", "q1"):
        first = refined_only.filter(pc.equal(refined_only["query_id"], q)).to_pydict()
        both = combined.filter(pc.equal(combined["query_id"], q)).to_pydict()
        verified = {i for i, n in zip(both["id"], both["inliers"], strict=True) if n >= 0}
        assert verified == set(first["id"][:3])  # the refined shortlist's top 3 were verified
        assert [i for i in both["id"] if i not in verified] == first["id"][3:]  # the rest in refined order


def test_stage_dba_needs_its_file(stage_inputs: dict) -> None:
    tmp = stage_inputs["tmp"]
    args = (str(tmp / "search.parquet"), str(tmp / "q"), str(tmp / "i"), str(tmp / "o.parquet"))
    with pytest.raises(ValueError, match="index URL"):
        rerank(*args, method="dba")
    with pytest.raises(FileNotFoundError, match="no DBA vectors"):
        rerank(*args, method="dba+qe", index_url=str(tmp / "elsewhere"))
    with pytest.raises(ValueError, match="allowed"):
        rerank(*args, method="verify+qe")


def test_cli_method_and_bad_method(stage_inputs: dict) -> None:
    tmp = stage_inputs["tmp"]
    args = [sys.executable, "-m", "pipeline.cli", "rerank", str(tmp / "search.parquet"), str(tmp / "q")]
    args += [str(tmp / "i"), str(tmp / "cli.parquet"), "--index", str(tmp / "index")]
    done = subprocess.run([*args, "--method", "dba+qe", "--qe-k", "3"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    meta = results.read_metadata(str(tmp / "cli.parquet"))
    assert meta["rerank_method"] == "dba+qe" and json.loads(meta["global_rerank_config"])["qe_k"] == 3
    bad = subprocess.run([*args, "--method", "dba+verify+qe"], capture_output=True, text=True)
    assert (
        bad.returncode == 2 and "'dba+verify+qe'" in bad.stderr and "Traceback" not in bad.stderr
    )  # the parser's choices


def test_run_config_rerank_method() -> None:
    from pipeline.runconfig import parse_run_config

    data = {"index": "i.parquet", "queries": "q.parquet"}
    config = parse_run_config(
        {"out": "o", "data": data, "rerank": {"method": "superglobal+verify", "sg_k": 4}}
    )
    assert config.rerank.method == "superglobal+verify"
    assert config.rerank.global_rerank_config() == GlobalRerankConfig(sg_k=4)
    with pytest.raises(ValueError, match="rerank: method='magic'"):
        parse_run_config({"out": "o", "data": data, "rerank": {"method": "magic"}})
    with pytest.raises(ValueError, match="rerank: sg_beta"):
        parse_run_config({"out": "o", "data": data, "rerank": {"sg_beta": 0.0}})
