"""Lazy, exactly resumable mini-batches over the WebDataset shards of a manifest, on any store URL.

`ShardStream` implements `dmd_core.streams.Stream` over tar shards written by `storage.shards.write_shard`
and listed by ShardRecords (keys relative to the store): file://, memory:// and s3:// alike.

Order. The stream is one endless global sequence of samples: epoch 0, then epoch 1, ... Each epoch visits
every shard once, in a permutation seeded by (seed, epoch); inside a shard a bounded shuffle buffer of
`shuffle_buffer` samples, seeded by (seed, epoch, position of the shard in that order), reorders the
samples. Seeds are derived with SHA-256 and the draws are counter-mode SHA-256, so the order does not
depend on Python's hash salt nor on numpy/torch versions. Batches are consecutive chunks of the global
sequence and may cross shard and epoch boundaries.

Distribution. A global batch is `batch_size * world_size` consecutive samples; rank r takes items
[r * batch_size, (r + 1) * batch_size) of it. Every rank reads (and checks) every shard and discards the
other ranks' items: simple and exact, at the cost of world_size times the reading. `world_size=1` with
batch B*W therefore yields the concatenation of what ranks 0..W-1 get with batch B. The state is the same
on every rank, so any rank may restore any rank's state (the rank itself is not part of it).

Resume. `state_dict()` is {"epoch", "shard" (position in the epoch's shard order), "offset" (samples of
that shard already consumed), "seed", "world_size", "shuffle_buffer", "manifest" (fingerprint of the
records)}. `load_state_dict` re-reads the current shard from its start and replays the seeded shuffle up
to `offset`, so the next batches equal those of an uninterrupted stream. A batch that fails leaves the
position where it was.

Memory. Shards are opened one at a time, read as a byte stream and parsed member by member. At most
`shuffle_buffer + batch_size * world_size` decoded samples are held at any time (the buffer, the
batch being built and the sample in flight); `max_held` records the most ever held.

Integrity. The SHA-256 of a shard is computed on the bytes as they are read and compared with the record
once the shard is exhausted (ChecksumError naming the shard); the sample count and index range are
checked too. Any read, parse or decode error is re-raised as ShardReadError naming the shard key. Nothing
is verified up front: samples of a shard read before the end of its bytes are delivered before its
checksum is known (none are when shuffle_buffer >= the shard's sample count).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from typing import IO, Any

import numpy as np
import torch
from webdataset.tariterators import group_by_keys, tar_file_iterator

from storage.manifest import ChecksumError, ShardRecord
from storage.shards import decode_sample
from storage.store import ArtifactStore

DEFAULT_SHUFFLE_BUFFER = 512
_CHUNK = 2**20
_STATE_KEYS = ("epoch", "shard", "offset", "seed", "world_size", "shuffle_buffer", "manifest")


class ShardReadError(ValueError):
    """A shard could not be read, parsed or decoded; the message names its key."""


def derive_seed(*parts: Any) -> int:
    """A 64-bit seed from SHA-256 of the JSON of `parts` (independent of Python's hash salt)."""
    blob = json.dumps(["dmd.ShardStream", *parts], separators=(",", ":")).encode("utf-8")
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little")


class _Draws:
    """Counter-mode SHA-256 integers: a random source that no library upgrade can change."""

    def __init__(self, seed: int) -> None:
        self._base = hashlib.sha256(int(seed).to_bytes(8, "little"))
        self._count = 0

    def below(self, n: int) -> int:
        """An integer in [0, n) (modulo bias below n / 2**64)."""
        h = self._base.copy()
        h.update(self._count.to_bytes(8, "little"))
        self._count += 1
        return int.from_bytes(h.digest()[:8], "little") % n


def shard_permutation(seed: int, epoch: int, n_shards: int) -> list[int]:
    """Record indices in the order epoch `epoch` visits them (a seeded Fisher-Yates permutation)."""
    order, draws = list(range(n_shards)), _Draws(derive_seed("shards", seed, epoch))
    for i in range(n_shards - 1, 0, -1):
        j = draws.below(i + 1)
        order[i], order[j] = order[j], order[i]
    return order


def manifest_fingerprint(records: Sequence[ShardRecord]) -> str:
    """SHA-256 of the records' keys, checksums and sizes, in the order given."""
    rows = [[r.shard, r.sha256, int(r.n_samples)] for r in records]
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode("utf-8")).hexdigest()


class _HashingReader:
    """Read-through wrapper hashing the bytes of one shard as tarfile consumes them."""

    def __init__(self, f: IO[bytes], key: str) -> None:
        self.f, self.key, self.digest, self.n_bytes = f, key, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.digest.update(data)
        self.n_bytes += len(data)
        return data

    def drain(self) -> None:
        """Hash what tarfile left unread (the end-of-archive padding, or anything after it)."""
        while self.read(_CHUNK):
            pass

    def __repr__(self) -> str:  # webdataset appends str(fileobj) to the errors it re-raises
        return f"<shard {self.key!r}>"


def read_shard(store: ArtifactStore, record: ShardRecord) -> Iterator[dict[str, Any]]:
    """Decoded samples of one shard in file order, streamed; checksum and count checked at its end."""
    key = record.shard
    n = 0
    try:
        with store.open(key, "rb") as f:
            reader = _HashingReader(f, key)
            members = ({**m, "__url__": key} for m in tar_file_iterator(reader))
            for raw in group_by_keys(members):
                sample = decode_sample(raw)
                if not record.first_index <= sample["index"] <= record.last_index:
                    raise ValueError(f"sample index {sample['index']} is outside the manifest's range "
                                     f"[{record.first_index}, {record.last_index}]")
                n += 1
                yield sample
            reader.drain()
    except Exception as e:
        raise ShardReadError(f"shard {key!r}: cannot read it: {type(e).__name__}: {e}") from e
    actual = reader.digest.hexdigest()
    if actual != record.sha256:
        raise ChecksumError(f"shard {key!r}: sha256 {actual} of the {reader.n_bytes} bytes read does not "
                            f"match manifest {record.sha256}")
    if n != record.n_samples:
        raise ShardReadError(f"shard {key!r}: read {n} samples, the manifest lists {record.n_samples}")


class _ShardCursor:
    """One open shard: its samples through a seeded bounded shuffle buffer."""

    def __init__(self, store: ArtifactStore, record: ShardRecord, buffer_size: int, seed: int) -> None:
        self.record, self.buffer = record, []
        self._size, self._draws = buffer_size, _Draws(seed)
        self._samples = self._shuffled(read_shard(store, record))

    def _shuffled(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        buf = self.buffer
        for sample in samples:
            if len(buf) < self._size:
                buf.append(sample)
                continue
            j = self._draws.below(self._size)
            out, buf[j] = buf[j], sample
            yield out
        while buf:  # reached only after read_shard checked the shard's bytes
            j = self._draws.below(len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()

    def next(self) -> dict[str, Any]:
        """The next sample; ShardReadError if the shard ends before the manifest says."""
        try:
            return next(self._samples)
        except StopIteration:
            raise ShardReadError(f"shard {self.record.shard!r}: ended before its {self.record.n_samples} "
                                 "samples") from None

    def finish(self) -> None:
        """After the last listed sample: make sure the shard holds nothing more (and was checked)."""
        extra = next(self._samples, None)
        if extra is not None:
            raise ShardReadError(f"shard {self.record.shard!r}: holds more than the {self.record.n_samples} "
                                 "samples its manifest lists")

    def close(self) -> None:
        self._samples.close()
        self.buffer.clear()


class ShardStream:
    """Endless seeded batches over WebDataset shards: lazy, bounded in memory, exactly resumable."""

    def __init__(self, store: ArtifactStore, records: Sequence[ShardRecord], batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER) -> None:
        self.records = list(records)
        if not self.records:
            raise ValueError("ShardStream needs at least one shard record; is the manifest empty?")
        keys = [r.shard for r in self.records]
        if len(set(keys)) != len(keys):
            twice = sorted(k for k in set(keys) if keys.count(k) > 1)
            raise ValueError(f"ShardStream records list a shard twice: {twice}")
        empty = [r.shard for r in self.records if int(r.n_samples) < 1]
        if empty:
            raise ValueError(f"ShardStream records with no samples: {empty}")
        for name, value, low in (("batch_size", batch_size, 1), ("world_size", world_size, 1),
                                 ("shuffle_buffer", shuffle_buffer, 1), ("rank", rank, 0)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
                raise ValueError(f"ShardStream {name}={value!r} must be an integer >= {low}")
        if rank >= world_size:
            raise ValueError(f"ShardStream rank={rank} must be < world_size={world_size}")
        self.store, self.batch_size, self.seed = store, int(batch_size), int(seed)
        self.rank, self.world_size, self.shuffle_buffer = int(rank), int(world_size), int(shuffle_buffer)
        self.fingerprint = manifest_fingerprint(self.records)
        self.n_samples = sum(int(r.n_samples) for r in self.records)
        self.max_held = 0  # the most decoded samples ever held at once
        self.epoch, self.shard, self.offset = 0, 0, 0
        self._order: tuple[int, list[int]] | None = None
        self._cursor: _ShardCursor | None = None

    def __repr__(self) -> str:
        return (f"ShardStream({self.store.root_url!r}, {len(self.records)} shards, "
                f"batch_size={self.batch_size}, rank={self.rank}/{self.world_size}, "
                f"epoch={self.epoch}, shard={self.shard}, offset={self.offset})")

    def shard_order(self, epoch: int) -> list[ShardRecord]:
        """The records in the order epoch `epoch` reads them."""
        return [self.records[i] for i in self._order_of(epoch)]

    def _order_of(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, shard_permutation(self.seed, epoch, len(self.records)))
        return self._order[1]

    def _open(self) -> _ShardCursor:
        record = self.records[self._order_of(self.epoch)[self.shard]]
        seed = derive_seed("samples", self.seed, self.epoch, self.shard)
        cursor = _ShardCursor(self.store, record, self.shuffle_buffer, seed)
        for _ in range(self.offset):  # replay the seeded shuffle up to the resume point
            cursor.next()
            self.max_held = max(self.max_held, len(cursor.buffer) + 1)
        return cursor

    def _next_sample(self, kept: int) -> dict[str, Any]:
        """The next sample of the global sequence; `kept` samples of this batch are held by the caller."""
        if self._cursor is None:
            self._cursor = self._open()
        sample = self._cursor.next()
        self.offset += 1
        self.max_held = max(self.max_held, len(self._cursor.buffer) + kept + 1)
        if self.offset == self._cursor.record.n_samples:
            self._cursor.finish()
            self._close()
            self.shard, self.offset = self.shard + 1, 0
            if self.shard == len(self.records):
                self.epoch, self.shard = self.epoch + 1, 0
        return sample

    def _close(self) -> None:
        if self._cursor is not None:
            self._cursor.close()
            self._cursor = None

    def next_batch(self, device: torch.device | str = "cpu") -> dict[str, Any]:
        """This rank's part of the next global batch: {"z", "y", "index"[, "cond"]} on `device`."""
        position = (self.epoch, self.shard, self.offset)
        first, last = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        kept: list[dict[str, Any]] = []
        try:
            for i in range(self.batch_size * self.world_size):
                sample = self._next_sample(len(kept))
                if first <= i < last:
                    kept.append(sample)
            return collate(kept, device)
        except BaseException:
            self._close()
            self.epoch, self.shard, self.offset = position
            raise

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch, JSON-serialisable and identical on every rank."""
        return {"epoch": self.epoch, "shard": self.shard, "offset": self.offset, "seed": self.seed,
                "world_size": self.world_size, "shuffle_buffer": self.shuffle_buffer,
                "manifest": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; ValueError if it belongs to another seed, world size, buffer or manifest."""
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"ShardStream state lacks {missing}; was it made by ShardStream.state_dict()?")
        for name in ("seed", "world_size", "shuffle_buffer"):
            if int(state[name]) != getattr(self, name):
                raise ValueError(f"ShardStream state has {name}={state[name]}, this stream has "
                                 f"{name}={getattr(self, name)}: build the stream with the {name} "
                                 "it was saved with")
        if state["manifest"] != self.fingerprint:
            raise ValueError("ShardStream state was saved over other shard records (manifest fingerprint "
                             f"{state['manifest']} != {self.fingerprint}): pass the same records "
                             "in the same order")
        epoch, shard, offset = int(state["epoch"]), int(state["shard"]), int(state["offset"])
        if epoch < 0 or not 0 <= shard < len(self.records):
            raise ValueError(f"ShardStream state epoch={epoch}, shard={shard} is out of range "
                             f"({len(self.records)} shards)")
        n = self.records[self._order_of(epoch)[shard]].n_samples
        if not 0 <= offset < n:
            raise ValueError(f"ShardStream state offset={offset} is out of range for a shard of {n} samples")
        self._close()
        self.epoch, self.shard, self.offset = epoch, shard, offset


def _cond(sample: dict[str, Any]) -> int | str | None:
    meta = sample.get("json") or {}
    if not isinstance(meta, dict):
        return None
    if meta.get("class") is not None:
        return int(meta["class"])
    prompt = meta.get("prompt")
    return prompt if isinstance(prompt, str) else None


def collate(samples: Sequence[dict[str, Any]], device: torch.device | str = "cpu") -> dict[str, Any]:
    """Stack decoded pair samples: z <- noise.npy, y <- image.npy (float32), index, cond (class or prompt).
    Real-image samples (the `real` stage's shards) have no noise.npy in any sample: then there is no z."""
    fields = ("noise.npy", "image.npy") if any("noise.npy" in s for s in samples) else ("image.npy",)
    for s in samples:
        for field in fields:
            if field not in s:
                raise ShardReadError(f"shard {s.get('__url__')!r} sample {s['__key__']}: no field {field!r} "
                                     f"(fields: {sorted(k for k in s if not k.startswith('__'))})")
    out: dict[str, Any] = {
        "y": torch.from_numpy(np.stack([s["image.npy"] for s in samples])).float().to(device),
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.long, device=device),
    }
    if "noise.npy" in fields:
        out["z"] = torch.from_numpy(np.stack([s["noise.npy"] for s in samples])).float().to(device)
    scales = [s["json"].get("guidance") if isinstance(s.get("json"), dict) else None for s in samples]
    if all(w is not None for w in scales):  # pairs made at several CFG scales record theirs
        out["guidance"] = torch.tensor(scales, dtype=torch.float32, device=device)
    conds = [_cond(s) for s in samples]
    kinds = {type(c) for c in conds}
    if kinds == {int}:
        out["cond"] = torch.tensor(conds, dtype=torch.long, device=device)
    elif kinds == {str}:
        out["cond"] = conds
    elif kinds != {type(None)}:
        shards = sorted({str(s.get("__url__")) for s in samples})
        raise ShardReadError(f"shards {shards}: a batch mixes samples with a class, a prompt or neither "
                             "in their json; give every sample the same kind of condition")
    return out
