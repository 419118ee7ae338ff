"""Image bytes for decoder tests, built at test time with pillow (no binary fixtures in the repository)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

EXIF_ORIENTATION = 0x0112


def encode(image: Image.Image, image_format: str, **save_options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **save_options)
    return buffer.getvalue()


def random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 noise."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def quadrants(height: int = 32, width: int = 48) -> np.ndarray:
    """(H, W, 3) uint8 with four flat colours (red, green / blue, white): survives JPEG, shows rotations."""
    image = np.zeros((height, width, 3), np.uint8)
    h, w = height // 2, width // 2
    image[:h, :w] = (255, 0, 0)
    image[:h, w:] = (0, 255, 0)
    image[h:, :w] = (0, 0, 255)
    image[h:, w:] = (255, 255, 255)
    return image


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming ``width`` × ``height`` RGB pixels, with no pixel data at all."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b"")


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def truncated_jpeg(keep_fraction: float = 0.5) -> bytes:
    data = encode(Image.fromarray(random_rgb(64, 64)), "JPEG", quality=90)
    return data[: int(len(data) * keep_fraction)]


def truncated_png(keep_fraction: float = 0.5) -> bytes:
    data = encode(Image.fromarray(random_rgb(64, 64)), "PNG")
    return data[: int(len(data) * keep_fraction)]


def animated(image_format: str, frames: int = 2) -> bytes:
    images = [Image.fromarray(random_rgb(16, 16, seed=i)) for i in range(frames)]
    return encode(images[0], image_format, save_all=True, append_images=images[1:], duration=100, loop=0)


def exif_rotated_jpeg(pixels: np.ndarray, orientation: int) -> bytes:
    """A JPEG of ``pixels`` as stored, tagged with an EXIF orientation for viewers to apply."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes())


def cmyk_jpeg(cmyk: tuple[int, int, int, int], size: tuple[int, int] = (16, 16)) -> bytes:
    return encode(Image.new("CMYK", size, cmyk), "JPEG", quality=95)


def sixteen_bit_png(values: np.ndarray) -> bytes:
    """A 16-bit grayscale PNG of uint16 ``values`` (H, W)."""
    return encode(Image.fromarray(values.astype(np.uint16)), "PNG")


def mpo(primary: np.ndarray, secondary: np.ndarray) -> bytes:
    """A multi-picture JPEG (as some cameras write) whose first picture is ``primary``."""
    images = [Image.fromarray(primary), Image.fromarray(secondary)]
    return encode(images[0], "MPO", save_all=True, append_images=images[1:], quality=95)


NOT_AN_IMAGE = b"<html><body>404 Not Found</body></html>"
