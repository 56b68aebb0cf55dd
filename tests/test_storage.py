"""ArtifactStore on memory://, file:// and a real moto S3 server: round trips, keys, atomicity."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

import storage.store as store_module
from storage import ArtifactStore

REPO = Path(__file__).resolve().parents[1]
BAD_KEYS = ["", "../x", "/abs", "s3://x", "a/../../b", "file:x", "a\\b", "a//b", "./a", ".dmd-tmp-x"]


def test_bytes_round_trip(store):
    store.write_bytes("a/b/c.bin", b"\x00\x01payload")
    assert store.read_bytes("a/b/c.bin") == b"\x00\x01payload"
    store.write_bytes("a/b/c.bin", b"second")
    assert store.read_bytes("a/b/c.bin") == b"second"
    assert store.url("a/b/c.bin") == store.root_url + "/a/b/c.bin"


def test_json_round_trip_sorted_indented(store):
    obj = {"z": 1, "a": [1.5, "x", None], "m": {"k": True}}
    store.write_json("cfg/run.json", obj)
    assert store.read_json("cfg/run.json") == obj
    assert store.read_bytes("cfg/run.json").decode() == json.dumps(obj, sort_keys=True, indent=2) + "\n"


def test_table_round_trip(store):
    table = pa.table({"i": [3, 1, 2], "x": [0.5, -1.0, 2.25], "s": ["a", "b", "c"]})
    store.write_table("t/table.parquet", table)
    assert store.read_table("t/table.parquet").equals(table)
    store.write_table("t/dict.parquet", {"k": [1, 2]})
    assert store.read_table("t/dict.parquet").column("k").to_pylist() == [1, 2]


def test_ls_exists_delete(store):
    assert store.ls() == []
    assert store.ls("nothing/here") == []
    for key in ["b/d/e.txt", "a.txt", "b/c.txt"]:
        store.write_bytes(key, key.encode())
    assert store.ls() == ["a.txt", "b/c.txt", "b/d/e.txt"]
    assert store.ls("b") == ["b/c.txt", "b/d/e.txt"]
    assert store.exists("b/c.txt") and not store.exists("b") and not store.exists("zz.txt")
    store.delete("b/c.txt")
    assert not store.exists("b/c.txt")
    assert store.ls() == ["a.txt", "b/d/e.txt"]
    with pytest.raises(FileNotFoundError, match="b/c.txt"):
        store.delete("b/c.txt")
    store.delete("b/c.txt", missing_ok=True)


def test_missing_key_errors_name_the_key(store):
    with pytest.raises(FileNotFoundError, match="no/such.bin"):
        store.read_bytes("no/such.bin")
    with pytest.raises(FileNotFoundError, match="no/such.bin"):
        store.info("no/such.bin")


@pytest.mark.parametrize("key", BAD_KEYS)
def test_rejects_unsafe_keys(store, key):
    for call in (store.url, store.exists, store.read_bytes, lambda k: store.write_bytes(k, b"x")):
        with pytest.raises(ValueError, match="key"):
            call(key)
    with pytest.raises(ValueError, match="key"):
        store.open(key, "wb")
    assert store.ls() == []


def test_bad_mode_and_root():
    with pytest.raises(ValueError, match="mode"):
        ArtifactStore("memory://dmd-bad-mode").open("k", "w")
    with pytest.raises(ValueError, match="root_url"):
        ArtifactStore("")


def test_info_size_token_and_sha256(store):
    store.write_bytes("x.bin", b"12345")
    first = store.info("x.bin")
    assert first["size"] == 5
    assert store.info("x.bin")["token"] == first["token"]
    store.write_bytes("x.bin", b"123456789")
    second = store.info("x.bin")
    assert second["size"] == 9 and second["token"] != first["token"]
    assert store.sha256("x.bin") == hashlib.sha256(b"123456789").hexdigest()


def test_child_store_shares_keys(store):
    child = store.child("runs/r1")
    child.write_bytes("out.bin", b"c")
    assert store.read_bytes("runs/r1/out.bin") == b"c"
    assert child.ls() == ["out.bin"]
    assert child.root_url == store.url("runs/r1")
    with pytest.raises(ValueError, match="prefix"):
        store.child("../up")


def test_pickled_store_reads_same_objects(store):
    store.write_bytes("p.bin", b"pickled")
    clone = pickle.loads(pickle.dumps(store))
    assert clone.root_url == store.root_url and clone.read_bytes("p.bin") == b"pickled"


def test_plain_local_path_root(tmp_path):
    plain = ArtifactStore(str(tmp_path))
    plain.write_bytes("k/v.bin", b"v")
    assert plain.url("k/v.bin") == f"file://{tmp_path}/k/v.bin"
    assert (tmp_path / "k" / "v.bin").read_bytes() == b"v"


@pytest.mark.parametrize("pipe_limit", [0, 1 << 30], ids=["put_file", "pipe_file"])
def test_streamed_write_both_upload_paths(store, monkeypatch, pipe_limit):
    monkeypatch.setattr(store_module, "PIPE_LIMIT", pipe_limit)
    data = os.urandom(300_000)
    with store.open("big/blob.bin", "wb") as f:
        for i in range(0, len(data), 65536):
            f.write(data[i : i + 65536])
    assert store.read_bytes("big/blob.bin") == data
    assert store.ls() == ["big/blob.bin"]


@pytest.mark.parametrize("preexisting", [False, True], ids=["new", "overwrite"])
def test_exception_inside_with_publishes_nothing(store, preexisting):
    if preexisting:
        store.write_bytes("k.bin", b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with store.open("k.bin", "wb") as f:
            f.write(b"half of the new bytes")
            f.flush()
            raise RuntimeError("boom")
    assert store.exists("k.bin") is preexisting
    assert store.ls() == (["k.bin"] if preexisting else [])
    if preexisting:
        assert store.read_bytes("k.bin") == b"old"


KILLED_WRITER = r"""
import json, os, signal, sys
from storage import ArtifactStore
store = ArtifactStore(sys.argv[1], **json.loads(sys.argv[2]))
with store.open(sys.argv[3], "wb") as f:
    f.write(b"x" * 65536)
    f.flush()
    print("half-written", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
print("unreachable", flush=True)
"""


@pytest.mark.parametrize("preexisting", [False, True], ids=["new", "overwrite"])
@pytest.mark.parametrize("backend", ["file", "s3"])
def test_killed_writer_publishes_nothing(store_factory, backend, preexisting):
    store = store_factory(backend)
    key = "shards/000000.tar"
    if preexisting:
        store.write_bytes(key, b"old")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, "-c", KILLED_WRITER, store.root_url, json.dumps(store.storage_options), key]
    proc = subprocess.run(args, capture_output=True, timeout=120, env=env, cwd=REPO)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert proc.stdout.decode().split() == ["half-written"]
    assert store.exists(key) is preexisting
    assert store.ls() == ([key] if preexisting else [])
    if preexisting:
        assert store.read_bytes(key) == b"old"
    if backend == "file":
        folder = Path(store.fs._strip_protocol(store.url("shards")))
        leftovers = [p for p in folder.iterdir() if p.name.startswith(store_module.TMP_PREFIX)]
        assert [p.stat().st_size for p in leftovers] == [65536]
