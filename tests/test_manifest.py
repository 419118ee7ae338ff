"""Manifests: formats, url resolution, validation (every error in one message), shards, fingerprint, diff."""

from __future__ import annotations

import io
import os
import tarfile
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import storage
from pipeline.images import load_image
from pipeline.manifest import (
    MANIFEST_SCHEMA,
    ManifestError,
    diff_manifests,
    manifest_fingerprint,
    read_manifest,
    split_shards,
)


def write_parquet(path, columns: dict, schema: pa.Schema | None = None) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table(columns, schema=schema), path)
    return str(path)


def manifest_errors(source: str, **kwargs) -> str:
    with pytest.raises(ManifestError) as caught:
        read_manifest(source, **kwargs)
    return str(caught.value)


# ------------------------------------------------------------------------------------------------- reading


def test_parquet_manifest_is_normalised(tmp_path) -> None:
    source = write_parquet(
        tmp_path / "m" / "manifest.parquet",
        {
            "id": ["a", "b", "c"],
            "url": ["img/a.jpg", "../b.jpg", "https://host/c.jpg?x=1"],
            "landmark_id": [7, None, 123456789012],
            "image": [None, b"\x01\x02", None],
            "bbox": [[1, 2, 30, 40], None, [0.5, 0.25, 2.5, 3.75]],
            "extra": ["dropped", "dropped", "dropped"],
        },
    )
    table = read_manifest(source)
    assert table.schema == MANIFEST_SCHEMA
    assert table.column("id").to_pylist() == ["a", "b", "c"]
    assert table.column("url").to_pylist() == [
        f"{tmp_path}/m/img/a.jpg",
        f"{tmp_path}/b.jpg",
        "https://host/c.jpg?x=1",
    ]
    assert table.column("landmark_id").to_pylist() == ["7", None, "123456789012"]
    assert table.column("image").to_pylist() == [None, b"\x01\x02", None]
    assert table.column("bbox").to_pylist() == [[1, 2, 30, 40], None, [0.5, 0.25, 2.5, 3.75]]


def test_relative_manifest_path_gives_absolute_urls(tmp_path, monkeypatch) -> None:
    write_parquet(tmp_path / "m.parquet", {"id": ["a"], "url": ["x/a.jpg"]})
    monkeypatch.chdir(tmp_path)
    assert read_manifest("m.parquet").column("url").to_pylist() == [f"{tmp_path}/x/a.jpg"]


def test_remote_manifest_resolves_relative_urls_against_its_folder() -> None:
    root = f"memory://manifests-{uuid.uuid4().hex}"
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.table({"id": ["a", "b"], "url": ["img/a.jpg", "/abs/b.jpg"]}), buffer)
    storage.write_bytes(f"{root}/v1/m.parquet", buffer.getvalue().to_pybytes())
    table = read_manifest(f"{root}/v1/m.parquet")
    assert table.column("url").to_pylist() == [f"{root}/v1/img/a.jpg", "/abs/b.jpg"]


def test_folder_and_glob_of_parquet_files_keep_file_order(tmp_path) -> None:
    write_parquet(tmp_path / "parts" / "part-1.parquet", {"id": ["c"], "url": ["c.jpg"], "etag": ["e3"]})
    write_parquet(tmp_path / "parts" / "part-0.parquet", {"id": ["a", "b"], "url": ["a.jpg", "sub/b.jpg"]})
    (tmp_path / "parts" / "notes.txt").write_text("ignored")
    for source in [str(tmp_path / "parts"), str(tmp_path / "parts" / "part-*.parquet")]:
        table = read_manifest(source)
        assert table.column("id").to_pylist() == ["a", "b", "c"]
        assert table.column("url").to_pylist()[1] == f"{tmp_path}/parts/sub/b.jpg"
        assert table.column("etag").to_pylist() == [None, None, "e3"]  # kept where any part has it


def test_inline_only_manifest_needs_no_url_column(tmp_path) -> None:
    table = read_manifest(write_parquet(tmp_path / "m.parquet", {"id": ["a"], "image": [b"jpeg"]}))
    assert table.column("url").to_pylist() == [""] and table.column("image").to_pylist() == [b"jpeg"]


def test_gldv2_train_csv(tmp_path) -> None:
    (tmp_path / "train.csv").write_text(
        "id,url,landmark_id\n"
        "6e158a47eb2ca3f6,https://upload.wikimedia.org/a.jpg,142820\n"
        "1e57000000000000,http://h/b.jpg,0007\n"
    )
    table = read_manifest(str(tmp_path / "train.csv"))
    assert table.schema == MANIFEST_SCHEMA
    assert table.column("id").to_pylist() == ["6e158a47eb2ca3f6", "1e57000000000000"]  # not parsed as numbers
    assert table.column("landmark_id").to_pylist() == ["142820", "0007"]


def test_gldv2_index_csv_without_urls_derives_them_from_image_root(tmp_path) -> None:
    (tmp_path / "index.csv").write_text("id\n0123abcd\nfedcba98\n")
    table = read_manifest(str(tmp_path / "index.csv"), image_root="s3://bucket/index")
    assert table.column("url").to_pylist() == [
        "s3://bucket/index/0/1/2/0123abcd.jpg",
        "s3://bucket/index/f/e/d/fedcba98.jpg",
    ]
    assert "pass image_root" in manifest_errors(str(tmp_path / "index.csv"))


def test_gldv2_index_csv_images_are_fetched_from_an_s3_image_root(tmp_path, s3_bucket) -> None:
    """GLDv2 as it ships: index.csv holds ids only; the images sit under index/a/b/c/ID.jpg."""
    pixels = {i: np.full((3, 4, 3), n * 60, dtype=np.uint8) for n, i in enumerate(["0123abcd", "fedcba98"])}
    for image_id, array in pixels.items():
        png = io.BytesIO()
        Image.fromarray(array).save(png, format="PNG")
        key = f"{s3_bucket.url}/index/{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"
        storage.write_bytes(key, png.getvalue(), s3_bucket.options)  # GLDv2 names every image .jpg
    (tmp_path / "index.csv").write_text("id\n0123abcd\nfedcba98\n")
    table = read_manifest(str(tmp_path / "index.csv"), s3_bucket.options, f"{s3_bucket.url}/index")
    assert table.column("id").to_pylist() == list(pixels)  # GLDv2's own ids: its ground truth matches
    for row in table.to_pylist():
        decoded = load_image(row, s3_bucket.options)  # (3, H, W)
        assert np.array_equal(decoded.permute(1, 2, 0).numpy(), pixels[row["id"]])


def test_ids_too_short_for_the_gldv2_layout_are_reported(tmp_path) -> None:
    (tmp_path / "index.csv").write_text("id\n0123abcd\nab\n")
    message = manifest_errors(str(tmp_path / "index.csv"), image_root="/images")
    assert "empty url and no inline image: 1 row(s) (1)" in message


def test_gldv2_test_csv_with_urls(tmp_path) -> None:
    (tmp_path / "test.csv").write_text("id,url\nq1,queries/q1.jpg\n")
    table = read_manifest(str(tmp_path / "test.csv"))
    assert table.column("url").to_pylist() == [f"{tmp_path}/queries/q1.jpg"]
    assert table.column("landmark_id").null_count == 1


def write_tar(path, members: dict[str, bytes]) -> str:
    """An uncompressed tar holding ``members`` (name -> bytes) after a folder entry, like GLDv2's shards."""
    with tarfile.open(path, "w") as archive:
        folder = tarfile.TarInfo("0")
        folder.type = tarfile.DIRTYPE
        archive.addfile(folder)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return str(path)


GLDV2_MEMBERS = {
    "0/1/2/0123abcd.jpg": b"first image" * 100,
    "f/e/d/fedcba98.jpg": b"second",
    "extra/photo.png": b"not in the GLDv2 layout",
    "0/1/2/._0123abcd.jpg": b"macOS resource fork",
    "images_000.md5": b"checksums, not an image",
}


def test_tar_shard_is_a_manifest_read_in_place(tmp_path) -> None:
    tar = write_tar(tmp_path / "images_000.tar", GLDV2_MEMBERS)
    table = read_manifest(tar)
    assert table.column("id").to_pylist() == ["0123abcd", "fedcba98", "extra/photo"]
    assert table.column("size").to_pylist() == [1100, 6, 23]
    urls = table.column("url").to_pylist()
    assert all(u.startswith(f"{tar}#offset=") for u in urls)
    assert [storage.read_bytes(u) for u in urls] == [GLDV2_MEMBERS[n] for n in list(GLDV2_MEMBERS)[:3]]
    with tarfile.open(tar) as archive:  # the offsets are tarfile's own
        expected = {m.name: m.offset_data for m in archive if m.isreg()}
    assert urls[0] == f"{tar}#offset={expected['0/1/2/0123abcd.jpg']}&size=1100"


def test_glob_and_folder_of_tar_shards_keep_file_order_and_find_duplicates(tmp_path) -> None:
    write_tar(tmp_path / "images_001.tar", {"a/b/c/abc2.jpg": b"2"})
    write_tar(tmp_path / "images_000.tar", {"a/b/c/abc1.jpg": b"1"})
    for source in (str(tmp_path / "images_*.tar"), str(tmp_path)):
        assert read_manifest(source).column("id").to_pylist() == ["abc1", "abc2"]
    write_tar(tmp_path / "images_002.tar", {"a/b/c/abc1.jpg": b"again"})
    assert "1 duplicate ids: 'abc1' at rows [0, 2]" in manifest_errors(str(tmp_path / "images_*.tar"))


def test_a_tar_that_is_not_one_is_reported(tmp_path) -> None:
    (tmp_path / "images_000.tar").write_bytes(b"<html>403 Forbidden</html>")
    assert "images_000.tar: unreadable: InputError" in manifest_errors(str(tmp_path / "images_000.tar"))


def test_tar_shard_on_s3_is_read_in_place(tmp_path, s3_bucket) -> None:
    pixels = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    members = {**GLDV2_MEMBERS, "a/b/c/abcpng.png": png.getvalue()}
    url = f"{s3_bucket.url}/train/images_000.tar"
    storage.upload(write_tar(tmp_path / "shard.tar", members), url, s3_bucket.options)
    table = read_manifest(url, s3_bucket.options)
    assert table.column("id").to_pylist() == ["0123abcd", "fedcba98", "extra/photo", "abcpng"]
    urls = table.column("url").to_pylist()
    assert urls[0].startswith(f"{url}#offset=")
    assert storage.read_bytes(urls[1], s3_bucket.options) == b"second"
    decoded = load_image(table.slice(3, 1).to_pylist()[0], s3_bucket.options)  # (3, H, W)
    assert np.array_equal(decoded.permute(1, 2, 0).numpy(), pixels)


def test_folder_of_images_is_a_manifest(tmp_path) -> None:
    for name in ["b.jpg", "a/x.PNG", "a/deep/y.webp", "notes.txt", ".hidden.jpg", ".cache/c.jpg"]:
        os.makedirs((tmp_path / name).parent, exist_ok=True)
        (tmp_path / name).write_bytes(b"not decoded here")
    table = read_manifest(str(tmp_path))
    assert table.schema == MANIFEST_SCHEMA
    assert dict(zip(table.column("id").to_pylist(), table.column("url").to_pylist(), strict=True)) == {
        "a/deep/y": f"{tmp_path}/a/deep/y.webp",
        "a/x": f"{tmp_path}/a/x.PNG",
        "b": f"{tmp_path}/b.jpg",
    }


def test_remote_folder_of_images_is_a_manifest() -> None:
    root = f"memory://photos-{uuid.uuid4().hex}"
    for name in ["x/1.jpg", "2.png"]:
        storage.write_bytes(f"{root}/{name}", b"bytes")
    table = read_manifest(root)
    assert table.column("id").to_pylist() == ["2", "x/1"]
    assert [storage.read_bytes(u) for u in table.column("url").to_pylist()] == [b"bytes", b"bytes"]


def test_folder_with_same_name_in_two_formats_is_a_duplicate(tmp_path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"1")
    (tmp_path / "a.png").write_bytes(b"2")
    assert "1 duplicate ids: 'a' at rows [0, 1]" in manifest_errors(str(tmp_path))


def test_unreadable_files_are_reported_with_the_other_problems(tmp_path) -> None:
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "0.parquet").write_bytes(b"PAR1 but not really")
    write_parquet(tmp_path / "parts" / "1.parquet", {"id": ["a"]})
    (tmp_path / "ragged.csv").write_text("id,url\na,a.jpg,extra\n")
    message = manifest_errors(str(tmp_path / "parts"))
    assert "0.parquet: unreadable: ArrowInvalid" in message and "1.parquet: missing column 'url'" in message
    assert "ragged.csv: unreadable: ArrowInvalid" in manifest_errors(str(tmp_path / "ragged.csv"))


def test_missing_sources_and_empty_folders_are_errors(tmp_path) -> None:
    assert "no such file" in manifest_errors(str(tmp_path / "absent.parquet"))
    assert "no such file" in manifest_errors(str(tmp_path / "*.parquet"))
    (tmp_path / "empty").mkdir()
    assert "holds no images" in manifest_errors(str(tmp_path / "empty"))


# ----------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        ({"url": ["a.jpg"]}, "missing column 'id'"),
        ({"id": ["a"]}, "missing column 'url'"),
        ({"id": [1], "url": ["a.jpg"]}, "column 'id' has type int64, expected string"),
        ({"id": ["a"], "url": [b"a.jpg"]}, "column 'url' has type binary, expected string"),
        ({"id": ["a"], "url": ["a"], "landmark_id": [1.5]}, "column 'landmark_id' has type double"),
        ({"id": ["a"], "url": ["a"], "image": ["text"]}, "column 'image' has type string, expected binary"),
        ({"id": ["a"], "url": ["a"], "bbox": ["1,2,3,4"]}, "column 'bbox' has type string"),
        ({"id": ["a"], "url": ["a"], "size": ["12"]}, "column 'size' has type string, expected int"),
        ({"id": [], "url": []}, "no rows"),
        ({"id": ["a", "", None], "url": ["a", "b", "c"]}, "empty or null id: 2 row(s) (1, 2)"),
        ({"id": ["a", "b", "c"], "url": ["a", "", None]}, "empty url and no inline image: 2 row(s) (1, 2)"),
        (
            {"id": ["a", "b", "a", "b", "a"], "url": list("vwxyz")},
            "2 duplicate ids: 'a' at rows [0, 2, 4]; 'b' at rows [1, 3]",
        ),
        ({"id": ["a", "b"], "url": ["a", "b"], "bbox": [[1, 2, 3], None]}, "bbox must hold 4 numbers"),
        ({"id": ["a", "b"], "url": ["a", "b"], "bbox": [None, [4, 2, 3, 5]]}, "0 <= x0 < x1"),
        ({"id": ["a"], "url": ["a"], "bbox": [[0, 5, 3, 5]]}, "1 row(s) (0)"),
        ({"id": ["a"], "url": ["a"], "bbox": [[-1, 0, 3, 5]]}, "0 <= x0 < x1"),
        ({"id": ["a"], "url": ["a"], "bbox": [[0, 0, float("nan"), 5]]}, "finite"),
        ({"id": ["a"], "url": ["a"], "bbox": [[0, 0, float("inf"), 5]]}, "finite"),
        ({"id": ["a"], "url": ["a"], "bbox": [[0, None, 3, 5]]}, "finite"),
    ],
)
def test_each_validation_error(tmp_path, columns: dict, expected: str) -> None:
    schema = pa.schema([("id", pa.string()), ("url", pa.string())]) if columns.get("id") == [] else None
    assert expected in manifest_errors(write_parquet(tmp_path / "m.parquet", columns, schema))


def test_all_problems_are_reported_in_one_error(tmp_path) -> None:
    write_parquet(tmp_path / "parts" / "0.parquet", {"id": [5], "url": ["a"]})
    write_parquet(tmp_path / "parts" / "1.parquet", {"id": ["x"], "url": ["a"], "bbox": [[1, 2]]})
    write_parquet(tmp_path / "parts" / "2.parquet", {"id": ["y"], "image": [b"i"], "landmark_id": [0.5]})
    write_parquet(tmp_path / "parts" / "3.parquet", {"id": ["z", "", "z"], "url": ["a", "b", ""]})
    message = manifest_errors(str(tmp_path / "parts"))
    assert "has 6 problem(s)" in message
    assert "empty or null id: 1 row(s) (4)" in message  # numbered in the whole manifest
    assert "empty url and no inline image: 1 row(s) (5)" in message
    assert "1 duplicate ids: 'z' at rows [3, 5]" in message
    assert "0.parquet: column 'id' has type int64" in message
    assert "bbox must hold 4 numbers [x0, y0, x1, y1]: 1 row(s) (1)" in message  # row 1 of the whole manifest
    assert "2.parquet: column 'landmark_id' has type double" in message


def test_row_problems_are_reported_together_with_a_few_examples(tmp_path) -> None:
    n = 20
    ids = [f"id{i % 8}" for i in range(n)]  # 8 distinct ids, all repeated
    urls = ["" if i % 3 == 0 else f"{i}.jpg" for i in range(n)]
    message = manifest_errors(write_parquet(tmp_path / "m.parquet", {"id": ids, "url": urls}))
    assert "has 2 problem(s)" in message
    assert "empty url and no inline image: 7 row(s) (0, 3, 6, 9, 12 and 2 more)" in message
    assert "8 duplicate ids: 'id0' at rows [0, 8, 16]" in message and "and 3 more" in message


def test_empty_url_is_fine_with_an_inline_image(tmp_path) -> None:
    source = write_parquet(
        tmp_path / "m.parquet", {"id": ["a", "b"], "url": ["", None], "image": [b"1", b"2"]}
    )
    assert read_manifest(source).column("url").to_pylist() == ["", ""]


def test_disallowed_schemes_are_not_manifest_errors(tmp_path) -> None:
    source = write_parquet(tmp_path / "m.parquet", {"id": ["a"], "url": ["ftp://host/a.jpg"]})
    assert read_manifest(source).column("url").to_pylist() == ["ftp://host/a.jpg"]


# -------------------------------------------------------------------------------------------------- shards


def small_manifest(n: int, url_prefix: str = "/img/") -> pa.Table:
    return pa.table(
        {
            "id": [f"id{i}" for i in range(n)],
            "url": [f"{url_prefix}{i}.jpg" for i in range(n)],
            "landmark_id": [str(i % 3) for i in range(n)],
            "image": pa.nulls(n, pa.binary()),
            "bbox": pa.nulls(n, pa.list_(pa.float32(), 4)),
        },
        schema=MANIFEST_SCHEMA,
    )


@pytest.mark.parametrize(
    ("n", "shard_size", "sizes"), [(10, 3, [3, 3, 3, 1]), (9, 3, [3, 3, 3]), (2, 5, [2]), (0, 4, [])]
)
def test_shards_cover_every_row_once_in_order(n: int, shard_size: int, sizes: list[int]) -> None:
    table = small_manifest(n)
    shards = split_shards(table, shard_size)
    assert [index for index, _ in shards] == list(range(len(sizes)))
    assert [rows.num_rows for _, rows in shards] == sizes
    joined = [i for _, rows in shards for i in rows.column("id").to_pylist()]
    assert joined == table.column("id").to_pylist()
    assert [r.column("id").to_pylist() for _, r in split_shards(table, shard_size)] == [
        r.column("id").to_pylist() for _, r in shards
    ]


@pytest.mark.parametrize("shard_size", [0, -3])
def test_shard_size_must_be_positive(shard_size: int) -> None:
    with pytest.raises(ValueError, match=f"got {shard_size}"):
        split_shards(small_manifest(3), shard_size)


# --------------------------------------------------------------------------------------------- fingerprint


def with_column(table: pa.Table, name: str, values: list) -> pa.Table:
    index = table.schema.get_field_index(name)
    return table.set_column(
        index, table.schema.field(index), pa.array(values, table.schema.field(index).type)
    )


def test_fingerprint_is_stable_across_reads_and_chunking(tmp_path) -> None:
    table = small_manifest(7)
    rechunked = pa.concat_tables([table.slice(0, 3), table.slice(3)])
    large_strings = table.cast(pa.schema([pa.field("id", pa.large_string()), *list(table.schema)[1:]]))
    pq.write_table(table, tmp_path / "m.parquet")
    reread = read_manifest(str(tmp_path / "m.parquet"))
    fingerprints = {manifest_fingerprint(t) for t in [table, rechunked, large_strings, reread]}
    assert len(fingerprints) == 1 and len(fingerprints.pop()) == 64


def test_fingerprint_changes_with_what_is_extracted_and_not_with_labels() -> None:
    table = small_manifest(4)
    base = manifest_fingerprint(table)
    variants = {
        "id": with_column(table, "id", ["id0", "id1", "id2", "idX"]),
        "url": with_column(table, "url", ["/img/0.jpg", "/img/1.jpg", "/img/2.jpg", "/img/3.png"]),
        "url boundary": with_column(table, "url", ["/img/0.jpg/", "img/1.jpg", "/img/2.jpg", "/img/3.jpg"]),
        "inline image": with_column(table, "image", [None, b"\x00", None, None]),
        "empty vs null image": with_column(table, "image", [None, b"", None, None]),
        "bbox": with_column(table, "bbox", [None, [0, 0, 1, 1], None, None]),
        "order": table.take([1, 0, 2, 3]),
    }
    fingerprints = {name: manifest_fingerprint(t) for name, t in variants.items()}
    assert base not in fingerprints.values() and len(set(fingerprints.values())) == len(variants)
    assert manifest_fingerprint(with_column(table, "landmark_id", ["9", "9", "9", None])) == base


# ---------------------------------------------------------------------------------------------------- diff


def test_diff_finds_added_changed_and_deleted_ids() -> None:
    old = small_manifest(5)  # id0..id4
    new = pa.concat_tables([small_manifest(7).slice(2), small_manifest(2).slice(0, 1)])  # id2..id6, id0
    new = with_column(
        new, "url", ["/img/2.jpg", "/img/3-v2.jpg", "/img/4.jpg", "/img/5.jpg", "/img/6.jpg", "/img/0.jpg"]
    )
    new = with_column(new, "image", [None, None, b"inline", None, None, None])
    diff = diff_manifests(old, new)
    assert diff.added == ("id5", "id6")
    assert diff.changed == ("id3", "id4")  # new url; inline image appeared
    assert diff.deleted == ("id1",)
    assert diff_manifests(old, old) == diff_manifests(new, new)
    assert diff_manifests(old, old).changed == () and diff_manifests(old, old).added == ()


def test_diff_compares_etag_and_size_when_both_have_them() -> None:
    table = small_manifest(4)
    old = table.append_column("etag", pa.array(["e0", "e1", None, "e3"])).append_column(
        "size", pa.array([10, 11, 12, 13], pa.int64())
    )
    new = table.append_column("etag", pa.array(["e0", "e1-new", "e2", "e3"])).append_column(
        "size", pa.array([10, 11, 12, 99], pa.int64())
    )
    assert diff_manifests(old, new).changed == ("id1", "id2", "id3")  # etag, null→etag, size
    assert diff_manifests(table, new).changed == ()  # old has no fingerprints: nothing to compare


def test_diff_of_manifests_read_from_files(tmp_path) -> None:
    write_parquet(tmp_path / "old.parquet", {"id": ["a", "b"], "url": ["a.jpg", "b.jpg"], "etag": ["1", "1"]})
    write_parquet(tmp_path / "new.parquet", {"id": ["b", "c"], "url": ["b.jpg", "c.jpg"], "etag": ["2", "1"]})
    diff = diff_manifests(
        read_manifest(str(tmp_path / "old.parquet")), read_manifest(str(tmp_path / "new.parquet"))
    )
    assert (diff.added, diff.changed, diff.deleted) == (("c",), ("b",), ("a",))


def test_bbox_column_round_trips_as_float32() -> None:
    boxes = np.array([[0.1, 0.2, 10.3, 20.4]], np.float64)
    table = pa.table({"id": ["a"], "url": ["/a"], "bbox": [boxes[0].tolist()]})
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    root = f"memory://bbox-{uuid.uuid4().hex}"
    storage.write_bytes(f"{root}/m.parquet", buffer.getvalue().to_pybytes())
    stored = read_manifest(f"{root}/m.parquet").column("bbox").to_pylist()[0]
    assert stored == boxes[0].astype(np.float32).tolist()


def test_the_optional_view_column_is_kept_as_numbers_and_checked(tmp_path) -> None:
    path = tmp_path / "views.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "url": ["a.jpg", "b.jpg"], "view": [3, None]}), path)
    table = read_manifest(str(path))
    assert table.schema.field("view").type == pa.float64()
    assert table.column("view").to_pylist() == [3.0, None]
    pq.write_table(pa.table({"id": ["a"], "url": ["a.jpg"], "view": ["front"]}), path)
    with pytest.raises(ManifestError, match="view"):
        read_manifest(str(path))
