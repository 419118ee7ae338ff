"""The report's embedding map: a 2-D t-SNE of the query and index global descriptors, drawn as inline SVG.

t-SNE (scikit-learn) keeps neighbourhoods, which is what a retrieval user wants to see: do the images of one
landmark form one island, and do the queries land on it? Its exact form costs O(n²), so the map is drawn on
a seeded sample (``max_points``: every query up to half of it, index images for the rest), and
the page states the sample. Points are coloured by landmark where the manifests give one (``landmark_id``);
queries are drawn as rings. Hovering shows a point's id and landmark; clicking shows its photo (an inlined
thumbnail) beside the map. No external asset: one <svg>, one small script.
"""

from __future__ import annotations

import hashlib
import html
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from pipeline import store
from pipeline.storage import Options

WIDTH, HEIGHT, MARGIN = 640, 480, 12


@dataclass(frozen=True)
class EmbeddingMap:
    """Map coordinates of a sample of a run's descriptors."""

    ids: list[str]
    points: np.ndarray  # (n, 2) in SVG pixels
    is_query: np.ndarray  # (n,) bool
    landmarks: list[str | None]
    queries: int  # descriptors in the query store
    index_images: int  # descriptors in the index store


def _sample(count: int, budget: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(count, size=min(count, budget), replace=False))


def _sampled(
    store_url: str, budget: int, rng: np.random.Generator, options: Options
) -> tuple[list[str], np.ndarray, int]:
    """A seeded sample of ``budget`` of a store's global descriptors — (ids, (n, D) vectors, descriptors in
    the store) — read shard by shard, so memory holds one shard and the sample, not the whole store."""
    total = sum(commit.ok for commit in store.read_commits(store_url, options))
    chosen = _sample(total, budget, rng)  # sorted positions in shard order
    ids, vectors, start = [], [], 0
    for shard_ids, shard_vectors in store.iter_global(store_url, options):
        rows = chosen[(chosen >= start) & (chosen < start + len(shard_ids))] - start
        ids += [str(i) for i in shard_ids[rows]]
        vectors.append(shard_vectors[rows])
        start += len(shard_ids)
    return ids, np.concatenate(vectors) if vectors else np.zeros((0, 0), np.float32), total


def embedding_map(
    query_store: str,
    index_store: str,
    landmarks: Mapping[str, str] | None = None,
    max_points: int = 1500,
    seed: int = 0,
    options: Options = None,
) -> EmbeddingMap:
    """t-SNE of a seeded sample of the two stores' global descriptors, scaled to the SVG's box."""
    from sklearn.manifold import TSNE  # imported here: only the report's map needs scikit-learn

    rng = np.random.default_rng(seed)
    query_ids, query_vectors, queries = _sampled(query_store, max_points // 2, rng, options)
    index_ids, index_vectors, index_images = _sampled(index_store, max_points - len(query_ids), rng, options)
    vectors = np.concatenate([v for v in (query_vectors, index_vectors) if v.size] or [np.zeros((0, 1))])
    vectors = vectors.astype(np.float32)
    ids = query_ids + index_ids
    is_query = np.arange(len(ids)) < len(query_ids)
    if len(ids) < 3 or np.ptp(vectors, axis=0).max() < 1e-6:  # nothing to spread: every point at one place
        points = np.zeros((len(ids), 2))
    else:
        perplexity = min(30.0, (len(ids) - 1) / 3)
        # Euclidean on the L2-normalised descriptors orders pairs as cosine does (and takes zero vectors);
        # exact, not Barnes-Hut: its quad tree crashed the process on coinciding points (an untrained model
        # gives them), and at a report's few hundred points the exact gradient costs seconds
        tsne = TSNE(2, perplexity=perplexity, init="pca", random_state=seed, method="exact")
        points = tsne.fit_transform(vectors)
    labels = landmarks or {}
    return EmbeddingMap(ids, _to_box(points), is_query, [labels.get(i) for i in ids], queries, index_images)


def _to_box(points: np.ndarray) -> np.ndarray:
    """Points scaled into the SVG's box (aspect kept), margins on every side."""
    if not len(points):
        return points.reshape(0, 2)
    low, span = points.min(0), np.ptp(points, 0)
    scale = min((WIDTH - 2 * MARGIN) / max(span[0], 1e-9), (HEIGHT - 2 * MARGIN) / max(span[1], 1e-9))
    return (points - low) * scale + MARGIN


def _colour(landmark: str | None) -> str:
    if landmark is None:
        return "#6b7280"
    hue = int(hashlib.sha256(landmark.encode()).hexdigest()[:6], 16) % 360
    return f"hsl({hue},70%,45%)"


def map_html(view: EmbeddingMap, photo: Callable[[str], str | None]) -> str:
    """The map as an HTML fragment; ``photo(id)`` gives a thumbnail's data URI (or None) for the click panel."""
    e = html.escape
    marks = []
    for i, (image_id, (x, y), query, landmark) in enumerate(
        zip(view.ids, view.points, view.is_query, view.landmarks, strict=True)
    ):
        colour, title = (
            _colour(landmark),
            f"{'query' if query else 'index'} {image_id}" + (f" · {landmark}" if landmark else ""),
        )
        style = (
            f'fill="none" stroke="{colour}" stroke-width="2" r="5"' if query else f'fill="{colour}" r="3.5"'
        )
        marks.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" {style} data-i="{i}"><title>{e(title)}</title></circle>'
        )
    photos = {str(i): uri for i, image_id in enumerate(view.ids) if (uri := photo(image_id))}
    note = (
        f"t-SNE of {int(view.is_query.sum())} of {view.queries} query and {int((~view.is_query).sum())} of "
        f"{view.index_images} index descriptors (seeded sample); rings are queries, colours are landmarks. "
        "Hover for the id, click for the photo."
    )
    return (
        f'<div class="panel emap"><h3>Embedding map</h3><p class="note">{e(note)}</p>'
        f'<div class="emap-row"><svg id="emap" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
        f'role="img" aria-label="embedding map">{"".join(marks)}</svg>'
        f'<figure id="emap-photo"><img alt=""><figcaption></figcaption></figure></div>'
        f'<script type="application/json" id="emap-photos">{_json_for_script(photos)}</script>'
        f"<script>{_SCRIPT}</script></div>"
    )


def _json_for_script(value: object) -> str:
    """JSON safe inside a <script> element (no "</" can close it)."""
    return json.dumps(value).replace("</", "<\\/")


_SCRIPT = """(() => {
  const photos = JSON.parse(document.getElementById('emap-photos').textContent);
  const figure = document.getElementById('emap-photo');
  document.getElementById('emap').addEventListener('click', (event) => {
    const mark = event.target.closest('circle');
    if (!mark) return;
    figure.querySelector('img').src = photos[mark.dataset.i] || '';
    figure.querySelector('figcaption').textContent = mark.querySelector('title').textContent;
  });
})();"""
