"""Fetching and decoding: a bad-row corpus built at test time, and pixel checks for every conversion."""

from __future__ import annotations

import email.utils
import io
import pickle
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFile, ImageOps

from pipeline import __version__, storage
from pipeline.images import (
    DEFAULT_ALLOWED_SCHEMES,
    REASONS,
    ImageError,
    decode_image,
    fetch_image_bytes,
    load_image,
)
from pipeline.manifest import read_manifest
from tests import badimages
from tests.servers import Fault


def decoded(data: bytes, **kwargs: int) -> np.ndarray:
    """(H, W, 3) uint8 array of decode_image's (3, H, W) tensor."""
    tensor = decode_image(data, **kwargs)
    assert tensor.dtype.is_floating_point is False and tensor.shape[0] == 3
    return tensor.permute(1, 2, 0).numpy()


def reason_of(data: bytes, **kwargs: int) -> ImageError:
    with pytest.raises(ImageError) as caught:
        decode_image(data, **kwargs)
    return caught.value


# ----------------------------------------------------------------------------------------------- bad rows

BAD_IMAGES = {
    "zero_bytes": (lambda: b"", "empty", "0 bytes"),
    "html_page": (lambda: badimages.NOT_AN_IMAGE, "not_an_image", "not an image"),
    "png_signature_then_garbage": (lambda: b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not_an_image", ""),
    "truncated_jpeg": (badimages.truncated_jpeg, "truncated", "truncated JPEG: image file is truncated ("),
    "jpeg_first_12_bytes": (lambda: badimages.truncated_jpeg(12 / 5000), "truncated", "truncated"),
    "truncated_png": (badimages.truncated_png, "truncated", "truncated PNG"),
    "bomb_100k_x_100k": (
        lambda: badimages.png_header_only(100_000, 100_000),
        "too_large",
        "10000000000 pixels",
    ),
    "animated_gif": (lambda: badimages.animated("GIF", 3), "animated", "animated GIF with 3 frames"),
    "animated_png": (lambda: badimages.animated("PNG"), "animated", "animated PNG"),
    "animated_webp": (lambda: badimages.animated("WEBP"), "animated", "animated WEBP"),
    "multipage_tiff": (lambda: badimages.animated("TIFF"), "animated", "animated TIFF"),
    "float_tiff": (
        lambda: badimages.encode(Image.fromarray(np.ones((4, 4), np.float32)), "TIFF"),
        "unsupported_mode",
        "mode 'F' in TIFF",
    ),
    "icon_format_not_opened": (
        lambda: badimages.encode(Image.fromarray(badimages.random_rgb(16, 16)), "ICO"),
        "not_an_image",
        "formats",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_image_gives_its_reason_and_a_readable_message(name: str) -> None:
    build, reason, message_part = BAD_IMAGES[name]
    error = reason_of(build())
    assert error.reason == reason
    assert message_part in str(error)


def test_pixel_limit_is_checked_from_the_header_before_decoding() -> None:
    # The file has no pixel data at all: decoding would fail as corrupt, so "too_large" proves the
    # size came from the header alone.
    header_only = badimages.png_header_only(5000, 5000)
    error = reason_of(header_only, max_pixels=1_000_000)
    assert error.reason == "too_large"
    assert "5000×5000" in str(error) and "max_pixels=1000000" in str(error)
    assert reason_of(header_only, max_pixels=25_000_000).reason == "not_an_image"


def test_pixel_limit_is_inclusive() -> None:
    image = badimages.encode(Image.fromarray(badimages.random_rgb(10, 20)), "PNG")
    assert decoded(image, max_pixels=200).shape == (10, 20, 3)
    assert reason_of(image, max_pixels=199).reason == "too_large"


def test_bad_arguments_are_value_errors() -> None:
    with pytest.raises(ValueError, match="max_pixels must be a positive pixel count, got 0"):
        decode_image(badimages.NOT_AN_IMAGE, max_pixels=0)
    with pytest.raises(ValueError, match="got the string 'https'"):
        fetch_image_bytes("https://host/a.jpg", None, allowed_schemes="https")


def test_truncated_images_are_not_accepted_even_if_a_library_allows_them(monkeypatch) -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        decode_image(badimages.truncated_jpeg())


def test_image_error_keeps_its_reason_through_pickle() -> None:
    error = ImageError("truncated", "truncated JPEG: image file is truncated")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.reason, str(copy)) == ("truncated", "truncated JPEG: image file is truncated")
    assert set(REASONS) >= {"missing", "empty", "scheme_not_allowed", "fetch_failed"}


# ------------------------------------------------------------------------------------- correct decoding


def test_rgb_png_decodes_exactly() -> None:
    pixels = badimages.random_rgb(12, 17)
    assert np.array_equal(decoded(badimages.encode(Image.fromarray(pixels), "PNG")), pixels)


def test_grayscale_becomes_three_equal_channels() -> None:
    gray = badimages.random_rgb(9, 7)[..., 0]
    rgb = decoded(badimages.encode(Image.fromarray(gray), "PNG"))
    assert np.array_equal(rgb, np.repeat(gray[..., None], 3, axis=2))


def test_sixteen_bit_png_is_scaled_to_eight_bits() -> None:
    values = np.array([[0, 1000, 25700], [32768, 65534, 65535]], np.uint16)
    expected = np.round(values / 65535 * 255).astype(np.uint8)  # [[0, 4, 100], [128, 255, 255]]
    rgb = decoded(badimages.sixteen_bit_png(values))
    assert np.array_equal(rgb[..., 0], expected) and np.array_equal(rgb[..., 2], expected)


def test_32_bit_integer_tiff_is_read_as_16_bit_data_and_clipped() -> None:
    values = np.array([[-5, 1000], [65535, 70000]], np.int32)
    rgb = decoded(badimages.encode(Image.fromarray(values), "TIFF"))
    assert np.array_equal(rgb[..., 1], [[0, 4], [255, 255]])


def test_rgba_is_composited_on_white() -> None:
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (8, 10, 4), dtype=np.uint8)
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 255  # fully transparent, fully opaque
    alpha = rgba[..., 3:].astype(np.float64) / 255
    expected = rgba[..., :3] * alpha + 255 * (1 - alpha)
    rgb = decoded(badimages.encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert np.abs(rgb.astype(np.float64) - expected).max() <= 1
    assert rgb[0, 0].tolist() == [255, 255, 255]
    assert rgb[0, 1].tolist() == rgba[0, 1, :3].tolist()


def test_gray_with_alpha_is_composited_on_white() -> None:
    la = np.array([[[0, 0], [0, 128], [200, 255]]], np.uint8)  # (1, 3, 2): gray, alpha
    rgb = decoded(badimages.encode(Image.fromarray(la, "LA"), "PNG"))
    assert np.abs(rgb[0, :, 0].astype(int) - [255, 127, 200]).max() <= 1


def test_palette_with_transparent_colour_is_white_there_and_exact_elsewhere() -> None:
    palette_image = Image.new("P", (4, 2), 0)
    palette_image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette_image.putpixel((1, 0), 1)
    plain = decoded(badimages.encode(palette_image, "PNG"))
    transparent = decoded(badimages.encode(palette_image, "GIF", transparency=0))
    assert plain[0, 0].tolist() == [10, 20, 30] and plain[0, 1].tolist() == [200, 100, 50]
    assert transparent[0, 0].tolist() == [255, 255, 255] and transparent[0, 1].tolist() == [200, 100, 50]


@pytest.mark.parametrize(
    ("cmyk", "rgb"),
    [((0, 255, 255, 0), (255, 0, 0)), ((255, 0, 255, 0), (0, 255, 0)), ((0, 0, 0, 255), (0, 0, 0))],
)
def test_cmyk_jpeg_becomes_rgb(cmyk: tuple[int, int, int, int], rgb: tuple[int, int, int]) -> None:
    pixels = decoded(badimages.cmyk_jpeg(cmyk))
    assert np.abs(pixels.reshape(-1, 3).astype(int) - rgb).max() <= 3


@pytest.mark.parametrize(("orientation", "clockwise_turns"), [(1, 0), (3, 2), (6, 1), (8, 3)])
def test_exif_orientation_is_applied(orientation: int, clockwise_turns: int) -> None:
    stored = badimages.quadrants(32, 48)
    upright = np.rot90(stored, k=-clockwise_turns)  # what a viewer shows
    pixels = decoded(badimages.exif_rotated_jpeg(stored, orientation))
    assert pixels.shape == upright.shape
    # Compare block centres: JPEG blurs the colour edges.
    h, w = upright.shape[:2]
    for y, x in [(h // 4, w // 4), (h // 4, 3 * w // 4), (3 * h // 4, w // 4), (3 * h // 4, 3 * w // 4)]:
        assert np.abs(pixels[y, x].astype(int) - upright[y, x]).max() <= 8, (y, x)


def test_mpo_decodes_its_primary_picture() -> None:
    primary = badimages.quadrants(32, 48)
    pixels = decoded(badimages.mpo(primary, badimages.random_rgb(32, 48)))
    assert pixels.shape == primary.shape
    assert np.abs(pixels[8, 12].astype(int) - primary[8, 12]).max() <= 8


# ----------------------------------------------------------------------------------------------- fetching


def test_inline_bytes_win_over_the_url(tmp_path) -> None:
    assert fetch_image_bytes(str(tmp_path / "absent.jpg"), b"abc") == b"abc"


def test_local_file_is_read_and_missing_file_is_missing(tmp_path) -> None:
    (tmp_path / "a.bin").write_bytes(b"123")
    assert fetch_image_bytes(str(tmp_path / "a.bin"), None) == b"123"
    assert fetch_image_bytes(f"file://{tmp_path}/a.bin", None) == b"123"
    for url in [str(tmp_path / "absent.jpg"), str(tmp_path)]:
        with pytest.raises(ImageError) as caught:
            fetch_image_bytes(url, None)
        assert caught.value.reason == "missing" and str(tmp_path) in str(caught.value)


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("ftp://example.org/a.jpg", DEFAULT_ALLOWED_SCHEMES),
        ("FTP://example.org/a.jpg", DEFAULT_ALLOWED_SCHEMES),
        ("/etc/hostname", {"http", "https"}),
        ("file:///etc/hostname", {"http", "https", "local"}),
    ],
)
def test_disallowed_scheme_is_a_row_error(url: str, allowed: set[str]) -> None:
    with pytest.raises(ImageError) as caught:
        fetch_image_bytes(url, None, allowed_schemes=allowed)
    assert caught.value.reason == "scheme_not_allowed" and "is not allowed" in str(caught.value)


def test_row_without_url_or_image_is_missing() -> None:
    for url in ["", None]:
        with pytest.raises(ImageError) as caught:
            fetch_image_bytes(url, None)
        assert caught.value.reason == "missing"


def test_http_fetch_and_404(tmp_path, http_server) -> None:
    pixels = badimages.random_rgb(6, 5)
    (tmp_path / "ok.png").write_bytes(badimages.encode(Image.fromarray(pixels), "PNG"))
    server = http_server(tmp_path)
    assert np.array_equal(load_image({"url": server.url("ok.png")}).permute(1, 2, 0).numpy(), pixels)
    with pytest.raises(ImageError) as caught:
        fetch_image_bytes(server.url("absent.jpg?sig=secret"), None)
    assert caught.value.reason == "missing" and "secret" not in str(caught.value)


def test_http_server_errors_are_fetch_failed(tmp_path, http_server) -> None:
    (tmp_path / "a.jpg").write_bytes(b"never served")
    server = http_server(tmp_path)
    server.add_fault("a.jpg", Fault(status=503))
    with pytest.raises(ImageError) as caught:
        fetch_image_bytes(server.url("a.jpg?sig=secret"), None)
    assert caught.value.reason == "fetch_failed" and "503" in str(caught.value)
    assert "secret" not in str(caught.value)


def test_http_requests_name_the_project_version_and_contact(tmp_path, http_server, monkeypatch) -> None:
    (tmp_path / "a.jpg").write_bytes(b"bytes")
    server = http_server(tmp_path)
    assert fetch_image_bytes(server.url("a.jpg"), None) == b"bytes"
    monkeypatch.setenv("LANDMARK_INDEX_CONTACT_URL", "https://ops.example.org/crawler")
    assert fetch_image_bytes(server.url("a.jpg"), None) == b"bytes"
    assert server.user_agents == [
        f"landmark-index/{__version__}",
        f"landmark-index/{__version__} (+https://ops.example.org/crawler)",
    ]


@pytest.mark.parametrize(
    ("status", "retry_after"),
    [(429, lambda: "1"), (503, lambda: email.utils.formatdate(time.time() + 2, usegmt=True))],
)
def test_retry_after_is_waited_for(tmp_path, http_server, status, retry_after) -> None:
    """The backoff alone would retry within 0.3 s; the answer asks for 1 s (or an HTTP date 1-2 s ahead)."""
    (tmp_path / "a.jpg").write_bytes(b"bytes")
    server = http_server(tmp_path)
    server.add_fault("a.jpg", Fault(status=status, times=1, headers=(("Retry-After", retry_after()),)))
    started = time.monotonic()
    assert fetch_image_bytes(server.url("a.jpg"), None) == b"bytes"
    assert 0.95 <= time.monotonic() - started < 10
    assert server.hits["/a.jpg"] == 2


def test_retry_after_beyond_the_bound_fails_the_row_at_once(tmp_path, http_server) -> None:
    (tmp_path / "a.jpg").write_bytes(b"bytes")
    server = http_server(tmp_path)
    server.add_fault("a.jpg", Fault(status=429, headers=(("Retry-After", "3600"),)))
    started = time.monotonic()
    with pytest.raises(ImageError) as caught:
        fetch_image_bytes(server.url("a.jpg"), None)
    assert time.monotonic() - started < 5 and server.hits["/a.jpg"] == 1
    assert caught.value.reason == "fetch_failed" and "retry after 3600 s" in str(caught.value)


@pytest.mark.parametrize("limit", [2, 5])
def test_concurrent_requests_per_host_are_limited(tmp_path, http_server, monkeypatch, limit) -> None:
    """8 threads fetch at once from a server answering each request after 0.5 s: at most ``limit`` overlap."""
    monkeypatch.setenv("LANDMARK_INDEX_HTTP_PER_HOST", str(limit))
    server = http_server(tmp_path)
    for i in range(8):
        (tmp_path / f"{i}.jpg").write_bytes(bytes([i]) * 10)
        server.add_fault(f"{i}.jpg", Fault(delay=0.5))
    with ThreadPoolExecutor(8) as pool:
        fetched = list(pool.map(lambda i: fetch_image_bytes(server.url(f"{i}.jpg"), None), range(8)))
    assert fetched == [bytes([i]) * 10 for i in range(8)]
    assert server.max_in_flight == limit


def test_a_server_ignoring_byte_ranges_cannot_pass_off_a_whole_tar_as_a_member(tmp_path, http_server) -> None:
    """Python's test server answers Range requests with the whole file: the member read must notice."""
    with tarfile.open(tmp_path / "images_000.tar", "w") as archive:
        info = tarfile.TarInfo("a/b/c/abc.jpg")
        info.size = 5
        archive.addfile(info, io.BytesIO(b"bytes"))
    server = http_server(tmp_path)
    with pytest.raises(ImageError) as caught:
        fetch_image_bytes(storage.tar_member_url(server.url("images_000.tar"), 512, 5), None)
    assert caught.value.reason == "fetch_failed" and "for a 5-byte member range" in str(caught.value)


# ----------------------------------------------------------------------------------- manifest rows end to end


def test_load_image_for_every_row_of_a_manifest(tmp_path) -> None:
    good = badimages.random_rgb(5, 7)
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "good.png").write_bytes(badimages.encode(Image.fromarray(good), "PNG"))
    (tmp_path / "img" / "cut.jpg").write_bytes(badimages.truncated_jpeg())
    rows = {
        "id": ["good", "cut", "gone", "inline", "ftp"],
        "url": ["img/good.png", "img/cut.jpg", "img/gone.jpg", "", "ftp://h/x.jpg"],
        "image": [None, None, None, badimages.encode(Image.fromarray(good), "BMP"), None],
    }
    pq.write_table(pa.table(rows), tmp_path / "m.parquet")
    outcomes = {}
    for row in read_manifest(str(tmp_path / "m.parquet")).to_pylist():
        try:
            outcomes[row["id"]] = load_image(row).permute(1, 2, 0).numpy()
        except ImageError as error:
            outcomes[row["id"]] = error.reason
    assert np.array_equal(outcomes.pop("good"), good) and np.array_equal(outcomes.pop("inline"), good)
    assert outcomes == {"cut": "truncated", "gone": "missing", "ftp": "scheme_not_allowed"}


@pytest.mark.shared
def test_real_photos_decode_like_pillow_reference(shared_dir) -> None:
    table = read_manifest(str(shared_dir / "data" / "landmarks-mini" / "images"))
    assert table.num_rows >= 30
    for row in table.to_pylist():
        with Image.open(row["url"]) as reference:
            expected = np.asarray(ImageOps.exif_transpose(reference).convert("RGB"))
        assert np.array_equal(load_image(row).permute(1, 2, 0).numpy(), expected), row["id"]
