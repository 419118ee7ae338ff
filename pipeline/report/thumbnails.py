"""Thumbnails of the images a report shows, loaded before rendering: decoded as the extractor decodes (so
match coordinates land on the same frame) and cached by content."""

from __future__ import annotations

import base64
import hashlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline import images, storage
from pipeline.embedding_map import EmbeddingMap
from pipeline.report.views import ImageSource, QueryView, ReportSettings
from pipeline.storage import Options, StorageError


@dataclass(frozen=True)
class Thumbnail:
    data_uri: str  # data:image/jpeg;base64,...
    width: int
    height: int
    original_size: tuple[int, int]  # (w, h) of the upright full image: the frame of match coordinates


def _load_bytes(source: ImageSource, options: Options) -> bytes | None:
    if source is None or isinstance(source, bytes):
        return source
    try:
        return storage.read_bytes(source, options)
    except (OSError, StorageError):
        return None  # the page says "image unavailable" rather than failing the whole report


def make_thumbnail(data: bytes, max_side: int, quality: int, height: int | None = None) -> Thumbnail | None:
    """A JPEG thumbnail with longest side ``max_side`` (or exactly ``height`` tall); None if undecodable.

    Decoded by pipeline.images, as the extractor decodes: only safe formats, pixel count checked first,
    upright, RGB; so match coordinates (extractor pixels) land on the same frame.
    """
    try:
        pixels = images.decode_image(data)  # (3, H, W) uint8
    except images.ImageError:
        return None
    image = Image.fromarray(np.ascontiguousarray(pixels.numpy().transpose(1, 2, 0)))
    original = image.size
    if height is not None:
        image = image.resize(
            (max(1, round(original[0] * height / original[1])), height), Image.Resampling.BILINEAR
        )
    else:
        image.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, optimize=True)
    uri = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return Thumbnail(uri, image.width, image.height, original)


class Thumbnails:
    """The thumbnails of one page by (source, height), loaded before rendering; an image shown twice (in both
    rankings, or under two sources) is read and decoded once."""

    def __init__(self, settings: ReportSettings, options: Options) -> None:
        self.settings, self.options = settings, options
        self.by_content: dict[tuple[str, int | None], Thumbnail | None] = {}
        self.loaded: dict[tuple[ImageSource, int | None], Thumbnail | None] = {}

    def load(self, source: ImageSource, height: int | None = None) -> None:
        if (source, height) in self.loaded:
            return
        data = _load_bytes(source, self.options)
        thumb = None
        if data is not None:
            key = (hashlib.sha1(data).hexdigest(), height)
            if key not in self.by_content:
                settings = self.settings
                self.by_content[key] = make_thumbnail(data, settings.thumb_px, settings.jpeg_quality, height)
            thumb = self.by_content[key]
        self.loaded[(source, height)] = thumb

    def get(self, source: ImageSource, height: int | None = None) -> Thumbnail | None:
        """A loaded thumbnail (None: the image is unavailable); KeyError for one never loaded (a gathering bug)."""
        return self.loaded[(source, height)]


def load_thumbnails(
    queries: Sequence[QueryView],
    settings: ReportSettings,
    options: Options = None,
    embedding: EmbeddingMap | None = None,
    sources: Mapping[str, ImageSource] | None = None,
) -> Thumbnails:
    """Every thumbnail a page of ``queries`` (and the embedding map, its photos from ``sources``) shows."""
    thumbs = Thumbnails(settings, options)
    for view in queries[: settings.max_queries]:
        thumbs.load(view.query_image)
        for hit in [*view.global_ranking[: settings.max_hits], *view.reranked[: settings.max_hits]]:
            thumbs.load(hit.image)
        pairs = view.match_pairs(settings.max_match_pairs)
        for image in [view.query_image, *(hit.image for hit in pairs)] if pairs else []:
            thumbs.load(image, settings.match_px)
    for image_id in embedding.ids if embedding is not None else []:
        thumbs.load((sources or {}).get(image_id))
    return thumbs
