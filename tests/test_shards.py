"""WebDataset shards and parquet manifests on memory://, file:// and a real moto S3 server."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from storage import (
    ChecksumError,
    iter_shards,
    read_manifest,
    sample_key,
    shard_record,
    verify_manifest,
    verify_shard,
    write_manifest,
    write_shard,
)


def make_samples(start: int, n: int) -> list[dict]:
    """Deterministic samples with fp16/fp32 .npy, json and png fields."""
    rng = np.random.default_rng(start)
    samples = []
    for i in range(start, start + n):
        samples.append(
            {
                "__key__": sample_key(i),
                "noise.npy": rng.standard_normal((4, 8, 8)).astype(np.float16),
                "image.npy": rng.standard_normal((3, 16, 16)).astype(np.float32),
                "json": {"index": i, "prompt": f"a photo of digit {i % 10}", "seed": 1234},
                "png": rng.integers(0, 256, (16, 12, 3), dtype=np.uint8),
                "mask.png": rng.integers(0, 256, (16, 12), dtype=np.uint8),
            }
        )
    return samples


def assert_same_sample(got: dict, want: dict) -> None:
    assert got["__key__"] == want["__key__"] and got["index"] == int(want["__key__"])
    for name in ("noise.npy", "image.npy", "png", "mask.png"):
        assert got[name].dtype == want[name].dtype, name
        assert got[name].shape == want[name].shape, name
        np.testing.assert_array_equal(got[name], want[name])
    assert got["json"] == want["json"]


def test_shard_round_trip(store):
    first, second = make_samples(0, 5), make_samples(5, 3)
    rec0 = write_shard(store, "shards/000000.tar", first, producer_hash="p1")
    rec1 = write_shard(store, "shards/000001.tar", second, producer_hash="p1")
    assert (rec0.n_samples, rec0.first_index, rec0.last_index) == (5, 0, 4)
    assert (rec1.n_samples, rec1.first_index, rec1.last_index) == (3, 5, 7)
    assert rec0.sha256 == store.sha256(rec0.shard) and rec0.n_bytes == store.info(rec0.shard)["size"]
    assert rec0.url == store.url("shards/000000.tar") and rec0.producer_hash == "p1"
    got = list(iter_shards([rec0.url, rec1.url], storage_options=store.storage_options))
    assert [s["index"] for s in got] == list(range(8))
    for g, w in zip(got, first + second):
        assert_same_sample(g, w)


def test_shards_are_byte_identical(store):
    a = write_shard(store, "a.tar", make_samples(10, 4))
    b = write_shard(store, "b.tar", make_samples(10, 4))
    assert a.sha256 == b.sha256 and a.n_bytes == b.n_bytes
    assert store.read_bytes("a.tar") == store.read_bytes("b.tar")
    c = write_shard(store, "c.tar", make_samples(11, 4))
    assert c.sha256 != a.sha256


def test_shard_record_reads_back_written_shard(store):
    written = write_shard(store, "s.tar", make_samples(3, 2), producer_hash="abc")
    again = shard_record(store, "s.tar", [3, 4], "abc")
    assert (again.sha256, again.n_bytes, again.first_index, again.last_index) == (
        written.sha256,
        written.n_bytes,
        3,
        4,
    )
    assert again.sha256 == hashlib.sha256(store.read_bytes("s.tar")).hexdigest()


def test_empty_shard_refused(store):
    with pytest.raises(ValueError, match="empty shard 'e.tar'"):
        write_shard(store, "e.tar", [])
    assert not store.exists("e.tar") and store.ls() == []


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"__key__": "0000001.5", "json": {}}, "not a %08d"),
        ({"__key__": "00000001", "noise.npy": np.array([{"a": 1}], dtype=object)}, "pickle|Object arrays"),
        ({"__key__": "00000001", "Noise.npy": np.zeros(2)}, "lowercase"),
        ({"__key__": "00000001", "png": np.zeros((4, 4), dtype=np.float32)}, "uint8"),
        ({"__key__": "00000001", "blob.pth": object()}, "unsupported type"),
    ],
)
def test_bad_samples_refused_and_nothing_written(store, bad, match):
    good = make_samples(0, 1)[0]
    with pytest.raises((ValueError, TypeError), match=match):
        write_shard(store, "bad.tar", [good, bad] if bad["__key__"] != good["__key__"] else [bad])
    assert not store.exists("bad.tar")


def test_duplicate_keys_refused(store):
    with pytest.raises(ValueError, match="duplicate sample key 00000002"):
        write_shard(store, "dup.tar", make_samples(2, 1) + make_samples(2, 1))
    assert not store.exists("dup.tar")


def test_corrupt_or_truncated_shard_raises_on_read(store):
    rec = write_shard(store, "t.tar", make_samples(0, 6))
    store.write_bytes("trunc.tar", store.read_bytes("t.tar")[: rec.n_bytes // 2 + 100])
    with pytest.raises(Exception, match="trunc.tar|unexpected end|truncated"):
        list(iter_shards([store.url("trunc.tar")], storage_options=store.storage_options))
    store.write_bytes("junk.tar", b"this is not a tar archive" * 50)
    with pytest.raises(Exception):
        list(iter_shards([store.url("junk.tar")], storage_options=store.storage_options))
    with pytest.raises(FileNotFoundError):
        list(iter_shards([store.url("missing.tar")], storage_options=store.storage_options))


def test_manifest_round_trip(store):
    records = [write_shard(store, f"shards/{i:06d}.tar", make_samples(4 * i, 4), "ph") for i in range(3)]
    write_manifest(store, "manifest.parquet", list(reversed(records)))
    assert read_manifest(store, "manifest.parquet") == records
    assert read_manifest(store, "absent.parquet") == []
    with pytest.raises(ValueError, match="twice"):
        write_manifest(store, "m2.parquet", records + records[:1])
    write_manifest(store, "empty.parquet", [])
    assert read_manifest(store, "empty.parquet") == []


def test_checksum_mismatch_names_the_shard(store):
    records = [write_shard(store, f"shards/{i:06d}.tar", make_samples(3 * i, 3)) for i in range(3)]
    verify_manifest(store, records)
    bad = records[1]
    data = bytearray(store.read_bytes(bad.shard))
    data[len(data) // 3] ^= 0xFF
    store.write_bytes(bad.shard, bytes(data))
    actual = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(ChecksumError) as err:
        verify_shard(store, bad)
    assert bad.shard in str(err.value) and bad.sha256 in str(err.value) and actual in str(err.value)
    verify_shard(store, records[0])
    verify_shard(store, records[2])
    with pytest.raises(ChecksumError, match="1 shard") as err:
        verify_manifest(store, records)
    assert bad.shard in str(err.value) and records[0].shard not in str(err.value)
    assert isinstance(err.value, ValueError)
