"""Manifests: which images to index, read from Parquet, GLDv2 CSV or a folder of images, validated up front.

A manifest source is one of
- a Parquet file, a folder of ``.parquet`` files, or a glob over Parquet/CSV files (any fsspec URL; files are
  read in sorted order);
- a GLDv2 CSV file: ``train.csv`` (id,url,landmark_id), ``index.csv`` / ``test.csv`` (id[,url]);
- uncompressed tar files (a ``.tar``, a glob such as ``images_*.tar``, or a folder of them, e.g. GLDv2's
  ``images_000.tar`` ...), read in place: each image member becomes a row whose url addresses its bytes inside
  the tar (:func:`pipeline.storage.tar_member_url`); ids as for a folder, except that GLDv2's layout
  ``a/b/c/ID.jpg`` (a, b, c = ID's first characters) gives ``ID`` itself, so GLDv2's ground truth matches;
- a folder of images (searched recursively): ids are the relative paths without extension.

Columns: ``id`` (string, required), ``url`` (http(s)://, s3://, gs://, file://, an absolute local path, or a path
relative to the manifest file's folder), ``landmark_id`` (int or string), ``image`` (inline bytes; the url may then
be empty), ``bbox`` (4 numbers x0, y0, x1, y1 in original pixels, or null), and the content fingerprints ``etag``
(string) and ``size`` (int) that :func:`diff_manifests` compares, and ``view`` (a number ordering the views of one
landmark — a view index, a capture time — that the quadruplet training loss uses). Other columns are dropped.

Every problem is collected and reported in one :class:`ManifestError` before any work starts. URL schemes are
not checked here: a disallowed scheme fails its own row at fetch time (``pipeline.images``), so one bad row
does not stop a large run.

Rooms: :mod:`~pipeline.manifest.read` (sources → one table), :mod:`~pipeline.manifest.checks` (the schema and
every problem in one error) and :mod:`~pipeline.manifest.identity` (fingerprint, shards, diff).
"""

from __future__ import annotations

from pipeline.manifest.checks import (
    FINGERPRINT_FIELDS,
    MANIFEST_SCHEMA,
    MAX_EXAMPLES,
    OPTIONAL_FIELDS,
    ManifestError,
)
from pipeline.manifest.identity import ManifestDiff, diff_manifests, manifest_fingerprint, split_shards
from pipeline.manifest.read import IMAGE_SUFFIXES, local_root, read_manifest

__all__ = [
    "FINGERPRINT_FIELDS",
    "IMAGE_SUFFIXES",
    "MANIFEST_SCHEMA",
    "MAX_EXAMPLES",
    "OPTIONAL_FIELDS",
    "ManifestDiff",
    "ManifestError",
    "diff_manifests",
    "local_root",
    "manifest_fingerprint",
    "read_manifest",
    "split_shards",
]
