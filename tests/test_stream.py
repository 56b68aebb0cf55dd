"""ShardStream: lazy, bounded, exactly resumable batches over WebDataset shards (file://, memory://, s3://)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from dmd_core.streams import Stream, TensorStream
from storage import (
    ChecksumError,
    ShardReadError,
    ShardStream,
    read_manifest,
    read_manifest_metadata,
    sample_key,
    write_manifest,
    write_shard,
)


def make_pairs(start: int, n: int, prompt: bool = False) -> list[dict]:
    """Pair samples with fp16 noise/image and a class (or a prompt) in their json; a function of each index."""
    out = []
    for i in range(start, start + n):
        rng = np.random.default_rng(i)
        meta = {"index": i, "prompt": f"digit {i % 10}"} if prompt else {"index": i, "class": i % 3}
        out.append({"__key__": sample_key(i), "noise.npy": rng.standard_normal((2, 4, 4)).astype(np.float16),
                    "image.npy": rng.standard_normal((2, 4, 4)).astype(np.float16), "json": meta})
    return out


def write_pairs(store, sizes: list[int], prompt: bool = False) -> list:
    """Shards of consecutive indices with the given sample counts, listed in a manifest; its records."""
    records, start = [], 0
    for i, n in enumerate(sizes):
        records.append(write_shard(store, f"pairs/{i:06d}.tar", make_pairs(start, n, prompt)))
        start += n
    write_manifest(store, "pairs/manifest.parquet", records, metadata={"sizes": sizes})
    return read_manifest(store, "pairs/manifest.parquet")


def take(stream, n: int) -> list[dict]:
    return [stream.next_batch() for _ in range(n)]


def assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in g:
            if isinstance(g[k], torch.Tensor):
                assert g[k].dtype == w[k].dtype and torch.equal(g[k], w[k]), k
            else:
                assert g[k] == w[k], k


@pytest.mark.parametrize("backend", ["memory", "file", "s3"])
def test_resume_is_bit_identical(store_factory, backend):
    store = store_factory(backend)
    records = write_pairs(store, [11, 7, 13])  # 31 samples an epoch
    assert read_manifest_metadata(store, "pairs/manifest.parquet") == {"sizes": [11, 7, 13]}

    def make():
        return ShardStream(store, records, batch_size=4, seed=3, shuffle_buffer=5)

    N = 9  # 36 samples: the resume point is past epoch 0, in the middle of epoch 1's first shard
    full = take(make(), 2 * N)
    first = make()
    head = take(first, N)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["epoch"] == 1 and 0 < state["offset"] < first.shard_order(1)[state["shard"]].n_samples
    assert set(state) >= {"epoch", "shard", "offset", "seed", "world_size"}
    resumed = make()
    resumed.load_state_dict(state)
    assert_same_batches(head + take(resumed, N), full)
    assert full[0]["z"].dtype == torch.float32 and full[0]["z"].shape == (4, 2, 4, 4)
    assert full[0]["cond"].dtype == torch.long and torch.equal(full[0]["cond"], full[0]["index"] % 3)


def test_resume_after_any_batch(store_factory):
    store = store_factory("memory")
    records = write_pairs(store, [5, 4, 6])  # seed 7 visits 4, 5, 6 then 6, 5, 4 samples: batches of 3
    # end mid-shard, at shard ends and at epoch ends

    def make(recs=records, shuffle_buffer=2):
        return ShardStream(store, recs, batch_size=3, seed=7, shuffle_buffer=shuffle_buffer)

    stream, states = make(), []
    full = []
    for _ in range(10):
        full.append(stream.next_batch())
        states.append(json.loads(json.dumps(stream.state_dict())))
    assert {(s["epoch"], s["shard"], s["offset"]) for s in states} >= {(0, 0, 3), (0, 2, 0), (1, 0, 0), (1, 1, 0)}
    for k, state in enumerate(states[:-1]):
        resumed = make()
        resumed.load_state_dict(state)
        assert_same_batches(take(resumed, 9 - k), full[k + 1:])
    with pytest.raises(ValueError, match="shuffle_buffer=2"):
        make(shuffle_buffer=3).load_state_dict(states[0])
    with pytest.raises(ValueError, match="other shard records"):
        make(recs=records[::-1]).load_state_dict(states[0])
    with pytest.raises(ValueError, match="lacks"):
        make().load_state_dict({"epoch": 0})


def test_batches_hold_the_stored_samples(store_factory):
    store = store_factory("memory")
    records = write_pairs(store, [5, 6], prompt=True)
    want = {int(s["__key__"]): s for s in make_pairs(0, 11, prompt=True)}
    batch = ShardStream(store, records, batch_size=11, seed=1, shuffle_buffer=3).next_batch()
    assert sorted(batch["index"].tolist()) == list(range(11))
    for row, i in enumerate(batch["index"].tolist()):
        assert torch.equal(batch["z"][row], torch.from_numpy(want[i]["noise.npy"]).float())
        assert torch.equal(batch["y"][row], torch.from_numpy(want[i]["image.npy"]).float())
        assert batch["cond"][row] == f"digit {i % 10}"
    assert batch["y"].dtype == torch.float32 and isinstance(batch["cond"], list)


def test_every_sample_once_per_epoch_and_epochs_differ(store_factory):
    store = store_factory("memory")
    records = write_pairs(store, [10, 10, 10])
    stream = ShardStream(store, records, batch_size=6, seed=0, shuffle_buffer=4)
    epochs = [torch.cat([b["index"] for b in take(stream, 5)]).tolist() for _ in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(30))
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(30))
    again = ShardStream(store, records, batch_size=6, seed=0, shuffle_buffer=4)
    assert torch.cat([b["index"] for b in take(again, 5)]).tolist() == epochs[0]
    other = ShardStream(store, records, batch_size=6, seed=1, shuffle_buffer=4)
    assert torch.cat([b["index"] for b in take(other, 5)]).tolist() != epochs[0]


def test_ranks_split_the_global_batch(store_factory):
    store = store_factory("file")
    records = write_pairs(store, [9, 8])
    single = take(ShardStream(store, records, batch_size=6, seed=5, shuffle_buffer=4), 7)
    ranks = [ShardStream(store, records, batch_size=3, seed=5, rank=r, world_size=2, shuffle_buffer=4)
             for r in range(2)]
    per_rank = [take(s, 7) for s in ranks]
    for step, whole in enumerate(single):
        parts = [per_rank[r][step] for r in range(2)]
        for k in ("z", "y", "index", "cond"):
            assert torch.equal(torch.cat([p[k] for p in parts]), whole[k]), (step, k)
    assert ranks[0].state_dict() == ranks[1].state_dict()
    with pytest.raises(ValueError, match="world_size=2"):
        ShardStream(store, records, batch_size=6, seed=5).load_state_dict(ranks[0].state_dict())
    with pytest.raises(ValueError, match="seed=5"):
        ShardStream(store, records, batch_size=3, seed=6, world_size=2).load_state_dict(ranks[0].state_dict())
    with pytest.raises(ValueError, match="rank=2"):
        ShardStream(store, records, batch_size=3, rank=2, world_size=2)


def test_memory_is_bounded_by_the_buffer(store_factory):
    store = store_factory("memory")
    records = write_pairs(store, [400, 400, 400])
    stream = ShardStream(store, records, batch_size=8, seed=2, shuffle_buffer=16)
    seen = torch.cat([b["index"] for b in take(stream, 1200 // 8 + 20)])
    assert sorted(seen[:1200].tolist()) == list(range(1200)) and stream.state_dict()["epoch"] == 1
    assert 16 < stream.max_held <= 16 + 8
    ranked = ShardStream(store, records, batch_size=4, seed=2, rank=1, world_size=2, shuffle_buffer=16)
    take(ranked, 160)
    assert ranked.max_held <= 16 + 4 * 2


def test_manifest_metadata(store_factory):
    store = store_factory("memory")
    records = write_pairs(store, [2])
    assert read_manifest_metadata(store, "pairs/manifest.parquet") == {"sizes": [2]}
    write_manifest(store, "plain.parquet", records)
    assert read_manifest_metadata(store, "plain.parquet") == {} and read_manifest(store, "plain.parquet") == records
    assert read_manifest_metadata(store, "absent.parquet") == {}
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        write_manifest(store, "bad.parquet", records, metadata={"x": object()})


def test_stream_protocol_and_tensor_stream():
    stream = TensorStream({"z": torch.zeros(4, 2), "y": torch.ones(4, 2)}, batch_size=2)
    assert isinstance(stream, Stream)


@pytest.mark.parametrize("damage", ["flip", "truncate-data", "truncate-member", "bad-header"])
def test_damaged_shard_is_named_when_read(store_factory, damage):
    store = store_factory("memory")
    records = write_pairs(store, [8, 8, 8])
    stream = ShardStream(store, records, batch_size=4, seed=0, shuffle_buffer=4)
    bad = stream.shard_order(0)[1]
    data = bytearray(store.read_bytes(bad.shard))
    sample = make_pairs(bad.first_index + 3, 1)[0]  # the fourth sample of the shard
    at = bytes(data).find(sample["image.npy"].tobytes())
    assert at > 0
    if damage == "flip":  # a payload byte: the tar still parses, only the checksum can tell
        data[at + 5] ^= 0xFF
    elif damage == "truncate-data":
        del data[at + 5:]
    elif damage == "truncate-member":  # cut exactly after a member: tarfile's stream mode ends silently there
        del data[(at // 512 + 1) * 512:]
    else:  # the next member's header: tarfile's stream mode takes it for the end of the archive, silently
        data[(at // 512 + 1) * 512 + 100] ^= 0xFF
    store.write_bytes(bad.shard, bytes(data))
    stream = ShardStream(store, records, batch_size=4, seed=0, shuffle_buffer=4)  # reads nothing yet
    take(stream, 2)  # the first shard in the order is intact
    error = ShardReadError if damage == "truncate-data" else ChecksumError
    with pytest.raises(error, match=re.escape(repr(bad.shard))):
        take(stream, 2)
    state = stream.state_dict()
    # only the checksum at the end of the bytes catches a flipped payload byte: 4 samples went out before
    assert (state["epoch"], state["shard"], state["offset"]) == (0, 1, 4 if damage == "flip" else 0)
    with pytest.raises(error, match=re.escape(repr(bad.shard))):
        take(stream, 2)  # a failed batch leaves the position where it was: it fails again, the same way
    assert stream.state_dict() == state
