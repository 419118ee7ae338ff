"""Fetch image bytes and decode them safely into uint8 RGB tensors; every failure is an :class:`ImageError`.

Decoding policy (pillow):
- only common photo formats are opened (:data:`SAFE_FORMATS`); others are "not_an_image", so exotic
  plugins (e.g. EPS, which runs Ghostscript) never see untrusted bytes;
- the pixel count is checked from the header, before any pixel is decoded ("too_large");
- more than one frame (GIF, APNG, WebP, multi-page TIFF) is "animated"; an MPO (camera JPEG with extra
  pictures) is decoded as its primary picture;
- truncated data is an error ("truncated"): ``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay False;
- a reduced decode (:func:`decode_reduced`, for images that are capped next) uses JPEG DCT scaling
  (``Image.draft``) or ``Image.reduce``, never below the capped size;
- EXIF orientation is applied; grayscale and CMYK become RGB; 16-bit grayscale (I;16*, and I read as 16-bit
  data) is scaled to 8 bits with round(v * 255 / 65535); transparency (RGBA, LA, PA, palette with a
  transparent colour) is composited on white, so transparent regions look like a plain background.
"""

from __future__ import annotations

import io
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from pipeline import metrics, storage
from pipeline.errors import ConfigError

REASONS = (
    "missing",  # no url/inline image, or nothing at the url (404, no such file)
    "empty",  # zero bytes
    "not_an_image",  # unknown format or corrupt data
    "truncated",  # the data ends before the image does
    "too_large",  # more pixels than max_pixels (decompression-bomb guard)
    "animated",  # more than one frame
    "unsupported_mode",  # a pixel format we do not convert (e.g. float, LAB)
    "scheme_not_allowed",  # the url's scheme is not in allowed_schemes
    "local_file_refused",  # a local file the manifest may not read (see LocalFiles)
    "fetch_failed",  # storage kept failing (network, permissions, server errors)
    "bad_bbox",  # the row's bbox is empty or outside its image
)
LOCAL = "local"  # the scheme name that allows plain local paths (and fsspec's local://)
DEFAULT_ALLOWED_SCHEMES = frozenset({"http", "https", "s3", "gs", "file", LOCAL})
DEFAULT_MAX_PIXELS = 64 * 2**20  # 8192 × 8192; bigger than any photo we index, far below a bomb
SAFE_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")  # JPEG includes MPO

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_TO_RGB_MODES = {"L", "1", "CMYK", "YCbCr", "RGBX"}
_DRAFT_FORMATS = {"JPEG", "MPO"}  # pillow decodes these at 1/2, 1/4, 1/8 scale in the DCT domain
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that swap width and height
_ORIENTATION = 0x0112


class ImageError(Exception):
    """One image that cannot be used: ``reason`` is one of :data:`REASONS`, ``str(error)`` says why."""

    def __init__(self, reason: str, message: str) -> None:
        assert reason in REASONS, reason
        super().__init__(reason, message)  # both in args, so the error pickles (Ray) with its reason
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class LocalFiles:
    """Which local files manifest rows may read: those under ``root`` (symlinks resolved, so a link that
    leads out of it is outside), or any file with ``allow_outside_root``. ``root`` None: no local file
    without the opt-in (a remote manifest must not make a worker read ``/etc/passwd``)."""

    root: str | None
    allow_outside_root: bool = False

    def refusal(self, url: str) -> str | None:
        """Why ``url`` may not be read, or None (remote urls are not this policy's concern)."""
        path = storage.local_path(url)
        if path is None or self.allow_outside_root:
            return None
        if self.root is None:
            return f"local file {path} refused: the manifest is not on local disk"
        real, root = os.path.realpath(path), os.path.realpath(self.root)
        if os.path.commonpath([real, root]) != root:
            return f"local file {path} refused: it is outside the manifest's root {self.root}"
        return None


ANY_LOCAL_FILE = LocalFiles(root=None, allow_outside_root=True)
OPT_IN_HINT = "allow it with --allow-local-files (allow_local_outside_root)"


def url_scheme(url: str) -> str:
    """The lower-case scheme of ``url``; :data:`LOCAL` for plain paths."""
    scheme, sep, _ = url.partition("://")
    return scheme.lower() if sep else LOCAL


def fetch_image_bytes(
    row_url: str | None,
    inline: bytes | None,
    options: storage.Options = None,
    allowed_schemes: Collection[str] = DEFAULT_ALLOWED_SCHEMES,
    local_files: LocalFiles = ANY_LOCAL_FILE,
) -> bytes:
    """The image bytes of one manifest row: ``inline`` when given, else the object at ``row_url`` if its
    scheme is allowed and, for a local file, ``local_files`` allows it."""
    if isinstance(allowed_schemes, str):
        raise ValueError(
            f"allowed_schemes must be a collection of scheme names, got the string {allowed_schemes!r}"
        )
    if inline is not None:
        return inline
    if not row_url:
        raise ImageError("missing", "no url and no inline image")
    scheme = url_scheme(row_url)
    if scheme not in allowed_schemes:
        raise ImageError(
            "scheme_not_allowed", f"url scheme {scheme!r} is not allowed (allowed: {sorted(allowed_schemes)})"
        )
    refused = local_files.refusal(row_url)
    if refused is not None:
        raise ImageError("local_file_refused", f"{refused}; {OPT_IN_HINT}")
    where = storage.redact(row_url)
    try:
        data = storage.read_bytes(row_url, options)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
        raise ImageError("missing", f"not found: {where} ({type(exc).__name__})") from exc
    except Exception as exc:  # a per-row failure must never stop the batch it belongs to
        detail = storage.redact_text(f"{type(exc).__name__}: {exc}")
        raise ImageError("fetch_failed", f"cannot read {where}: {detail}") from None
    metrics.count("bytes_read", len(data))
    return data


@dataclass(frozen=True)
class ReducedImage:
    pixels: torch.Tensor  # (3, h, w) uint8 RGB, upright; h ≤ H, w ≤ W, never below the capped size
    full_size: tuple[int, int]  # (H, W) of the upright image at full resolution


def capped_size(height: int, width: int, max_side: float) -> tuple[int, int]:
    """(h, w) with the longest side at most ``max_side`` (never upscaled), rounded like the reference."""
    longest = max(height, width)
    if longest <= max_side:
        return height, width
    factor = max_side / longest
    return max(1, round(height * factor)), max(1, round(width * factor))


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Decode ``data`` into a uint8 RGB tensor (3, H, W), upright as EXIF says. Raises :class:`ImageError`."""
    return _decode(data, max_pixels, None).pixels


def decode_reduced(data: bytes, max_side: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> ReducedImage:
    """Decode ``data`` cheaply for an image that is capped at ``max_side`` next: JPEG in the DCT domain at
    1/2, 1/4 or 1/8 scale (``Image.draft``), other formats shrunk by an integer box filter (``Image.reduce``),
    by the largest factor that keeps both sides ≥ the capped size. The pixels differ from resizing the full
    decode (DCT/box filtering instead of bilinear). Raises :class:`ImageError`."""
    if max_side < 1:
        raise ConfigError(f"max_side must be a positive pixel count, got {max_side}")
    return _decode(data, max_pixels, max_side)


def _decode(data: bytes, max_pixels: int, max_side: int | None) -> ReducedImage:
    """Full decode when ``max_side`` is None, else reduced for capping at ``max_side``."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: truncated images would pass silently"
        )
    if max_pixels < 1:
        raise ConfigError(f"max_pixels must be a positive pixel count, got {max_pixels}")
    if not data:
        raise ImageError("empty", "empty image: 0 bytes")
    image = _open_checked(data, max_pixels)
    width, height = image.size
    capped_h, capped_w = capped_size(height, width, max_side) if max_side else (height, width)
    factor = min(height // capped_h, width // capped_w)  # the largest that keeps both sides ≥ capped
    try:
        if factor > 1 and image.format in _DRAFT_FORMATS:
            # pillow picks the largest DCT scale (8, 4, 2) ≤ min(W // w, H // h) = factor for this request
            image.draft("RGB", (capped_w, capped_h))
            factor = 1
        image.load()
        if image.getexif().get(_ORIENTATION) in _TRANSPOSED_ORIENTATIONS:  # after load: PNG's may trail
            width, height = height, width
        ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of upright images
    except Exception as exc:  # pillow raises OSError, SyntaxError, ValueError... for bad data
        raise _decode_error(image.format, exc) from exc
    rgb = _to_rgb(image)
    if factor > 1:
        rgb = rgb.reduce(factor)
    bands = rgb.split()  # planar R, G, B: one pass, no HWC -> CHW transpose
    pixels = torch.from_numpy(np.stack([np.asarray(band) for band in bands]))  # (3, h, w) uint8
    return ReducedImage(pixels, (height, width))


def load_image(
    row: Mapping[str, Any],
    options: storage.Options = None,
    allowed_schemes: Collection[str] = DEFAULT_ALLOWED_SCHEMES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    local_files: LocalFiles = ANY_LOCAL_FILE,
) -> torch.Tensor:
    """Fetch and decode one manifest row (keys ``url`` and optionally ``image``): uint8 (3, H, W) RGB."""
    data = fetch_image_bytes(row.get("url"), row.get("image"), options, allowed_schemes, local_files)
    return decode_image(data, max_pixels)


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """The opened (header-only) image after the format, size and frame checks; no pixels decoded yet."""
    try:
        image = Image.open(io.BytesIO(data), formats=SAFE_FORMATS)
    except Image.DecompressionBombError as exc:  # pillow's own guard, at twice its MAX_IMAGE_PIXELS
        raise ImageError("too_large", f"image too large: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageError("not_an_image", f"not an image ({len(data)} bytes, formats {SAFE_FORMATS})") from exc
    except Exception as exc:
        raise _decode_error(None, exc) from exc
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(
            "too_large",
            f"{image.format} of {width}×{height} = {width * height} pixels exceeds max_pixels={max_pixels}",
        )
    if getattr(image, "is_animated", False) and image.format != "MPO":
        raise ImageError(
            "animated", f"animated {image.format} with {getattr(image, 'n_frames', '>1')} frames"
        )
    return image


def _decode_error(image_format: str | None, exc: Exception) -> ImageError:
    kind = image_format or "image"
    if "truncated" in str(exc).lower():
        return ImageError("truncated", f"truncated {kind}: {exc}")
    return ImageError("not_an_image", f"corrupt {kind} data: {type(exc).__name__}: {exc}")


def _to_rgb(image: Image.Image) -> Image.Image:
    """An RGB image from any supported mode (see the module docstring for the policy)."""
    mode = image.mode
    if mode == "RGB":
        return image  # convert() would copy
    if mode == "P":
        return _on_white(image.convert("RGBA")) if "transparency" in image.info else image.convert("RGB")
    if mode in _ALPHA_MODES:
        return _on_white(image.convert("RGBA"))
    if mode in _SIXTEEN_BIT_MODES:
        return Image.fromarray(_sixteen_to_eight_bit(np.asarray(image))).convert("RGB")
    if mode in _TO_RGB_MODES:
        return image.convert("RGB")
    raise ImageError("unsupported_mode", f"unsupported pixel mode {mode!r} in {image.format}")


def _on_white(rgba: Image.Image) -> Image.Image:
    """Alpha-composite over an opaque white background."""
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _sixteen_to_eight_bit(values: np.ndarray) -> np.ndarray:
    """round(v * 255 / 65535) for 16-bit samples (wider "I" values are clipped to 0..65535 first)."""
    wide = np.clip(values.astype(np.int64), 0, 65535)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)
