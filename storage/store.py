"""Artifact store: a narrow interface over fsspec on plain string URLs (the only fsspec import)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import socket
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import IO, Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

# Local atomic writes leave a temporary sibling under this prefix; keys may not use it.
TMP_PREFIX = ".dmd-tmp-"
# Remote writes up to this size are uploaded with one `pipe_file`, larger ones with `put_file`.
PIPE_LIMIT = 8 * 2**20
_CHUNK = 2**20
_HOST = socket.gethostname().replace("~", "-")


def check_key(key: str, what: str = "key") -> str:
    """Return `key` if it is a safe relative POSIX path, else raise ValueError naming it."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"{what} {key!r} is empty; use a relative POSIX path like 'shards/000000.tar'")
    if "\\" in key or "\x00" in key:
        raise ValueError(f"{what} {key!r} contains a backslash or NUL; use '/' as separator")
    if key.startswith("/"):
        raise ValueError(f"{what} {key!r} is absolute; keys are relative to the store root")
    if ":" in key:
        raise ValueError(f"{what} {key!r} contains a URL scheme or ':'; keys are relative POSIX paths")
    for part in key.rstrip("/").split("/"):
        if part in ("", ".", ".."):
            raise ValueError(f"{what} {key!r} has an empty, '.' or '..' segment")
        if part.startswith(TMP_PREFIX):
            raise ValueError(f"{what} {key!r} uses the reserved prefix {TMP_PREFIX!r}")
    return key.rstrip("/")


def open_url(url: str, mode: str = "rb", **storage_options: Any) -> IO[bytes]:
    """Open a full URL for reading through fsspec (used by the WebDataset gopen handlers)."""
    if mode != "rb":
        raise ValueError(f"open_url({url!r}) supports only mode 'rb', got {mode!r}")
    return fsspec.open(url, mode, **storage_options).open()


class AtomicWriter(io.RawIOBase):
    """Binary writer that publishes its bytes only on a clean close; abort() discards them."""

    def __init__(self, tmp: IO[bytes], commit: Callable[[IO[bytes]], None], discard: Callable[[], None]):
        super().__init__()
        self._tmp, self._commit, self._discard = tmp, commit, discard

    def writable(self) -> bool:
        """Writers are writable."""
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        """Append bytes to the spooled temporary file."""
        return self._tmp.write(data)

    def flush(self) -> None:
        """Flush the temporary file (publishes nothing)."""
        if not self._tmp.closed:
            self._tmp.flush()

    def tell(self) -> int:
        """Bytes written so far."""
        return self._tmp.tell()

    def close(self) -> None:
        """Publish the object in one step, then release the temporary file."""
        if self.closed:
            return
        try:
            self._commit(self._tmp)
        except BaseException:
            self._discard()
            raise
        finally:
            super().close()

    def abort(self) -> None:
        """Discard everything written; nothing becomes visible."""
        if not self.closed:
            self._discard()
            super().close()

    def __del__(self) -> None:
        """An unclosed writer that is garbage-collected publishes nothing."""
        self.abort()

    def __exit__(self, exc_type, exc, tb) -> None:
        """Commit on a clean exit, discard when the block raised."""
        if exc_type is None:
            self.close()
        else:
            self.abort()


class ArtifactStore:
    """Keys (relative POSIX paths) under one root URL: file://, memory://, s3://, gs://."""

    def __init__(self, root_url: str, **storage_options: Any):
        if not isinstance(root_url, str) or not root_url:
            raise ValueError(f"ArtifactStore root_url {root_url!r} must be a non-empty URL or path")
        self.storage_options = dict(storage_options)
        self.fs, root = url_to_fs(root_url, **storage_options)
        self._root = root.rstrip("/")
        self._local = isinstance(self.fs, LocalFileSystem)
        self.root_url = self.fs.unstrip_protocol(self._root or "/")

    def __repr__(self) -> str:
        return f"ArtifactStore({self.root_url!r})"

    def __getstate__(self) -> dict:
        return {"root_url": self.root_url, "storage_options": self.storage_options}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["root_url"], **state["storage_options"])

    def _path(self, key: str) -> str:
        return f"{self._root}/{check_key(key)}"

    def _fresh(self, path: str | None = None) -> None:
        if not self._local:
            self.fs.invalidate_cache(path)

    def url(self, key: str) -> str:
        """Full URL of `key`."""
        return self.fs.unstrip_protocol(self._path(key))

    def child(self, prefix: str) -> ArtifactStore:
        """A store rooted at `prefix` inside this one, with the same storage options."""
        return ArtifactStore(self.url(check_key(prefix, "prefix")), **self.storage_options)

    def exists(self, key: str) -> bool:
        """True if an object (not a folder) exists at `key`."""
        path = self._path(key)
        self._fresh(path)
        return bool(self.fs.isfile(path))

    def ls(self, prefix: str = "") -> list[str]:
        """Sorted keys of all objects under `prefix` (recursive, files only)."""
        base = self._path(prefix) if prefix else (self._root or "/")
        self._fresh()
        if not self.fs.exists(base):
            return []
        start = len(self._root) + 1
        keys = (p[start:] for p in self.fs.find(base, withdirs=False))
        return sorted(k for k in keys if k and not any(s.startswith(TMP_PREFIX) for s in k.split("/")))

    def glob(self, pattern: str) -> list[str]:
        """Sorted keys matching a glob `pattern` relative to the root (e.g. "*/config.json")."""
        self._fresh()
        start = len(self._root) + 1
        return sorted(p[start:] for p in self.fs.glob(f"{self._root}/{pattern}"))

    def open(self, key: str, mode: str = "rb") -> IO[bytes]:
        """Open `key`: 'rb' reads, 'wb' writes atomically (visible only after a clean close)."""
        path = self._path(key)
        if mode == "rb":
            self._fresh(path)
            try:
                return self.fs.open(path, "rb")
            except FileNotFoundError as e:
                raise FileNotFoundError(f"no object at key {key!r} ({self.url(key)})") from e
        if mode == "wb":
            return self._local_writer(path) if self._local else self._remote_writer(path)
        raise ValueError(f"open({key!r}): mode must be 'rb' or 'wb', got {mode!r}")

    def _local_writer(self, path: str) -> AtomicWriter:
        folder, name = os.path.split(path)
        os.makedirs(folder, exist_ok=True)
        # The writer's host and pid in the name let a later run tell a dead writer's leftover from a live one's.
        tmp = tempfile.NamedTemporaryFile(dir=folder, prefix=f"{TMP_PREFIX}{_HOST}~{os.getpid()}~{name}-",
                                          delete=False)

        def commit(f: IO[bytes]) -> None:
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.chmod(f.name, 0o666 & ~current_umask())  # mkstemp makes 0600; published files follow the umask
            os.replace(f.name, path)
            _fsync_dir(folder)

        def discard() -> None:
            tmp.close()
            if os.path.exists(tmp.name):
                os.unlink(tmp.name)

        return AtomicWriter(tmp, commit, discard)

    def _remote_writer(self, path: str) -> AtomicWriter:
        tmp = tempfile.NamedTemporaryFile(prefix="dmd-upload-")

        def commit(f: IO[bytes]) -> None:
            f.flush()
            if f.tell() <= PIPE_LIMIT:
                f.seek(0)
                self.fs.pipe_file(path, f.read())
            else:
                self.fs.put_file(f.name, path)
            f.close()
            self._fresh(path)

        return AtomicWriter(tmp, commit, tmp.close)

    def read_bytes(self, key: str) -> bytes:
        """Whole object at `key` as bytes."""
        with self.open(key, "rb") as f:
            return f.read()

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write `data` to `key` atomically."""
        if not self._local:
            self.fs.pipe_file(self._path(key), bytes(data))
            self._fresh(self._path(key))
            return
        with self.open(key, "wb") as f:
            f.write(data)

    def read_json(self, key: str) -> Any:
        """Parse the JSON object at `key`."""
        try:
            return json.loads(self.read_bytes(key).decode("utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"key {key!r} is not valid JSON: {e}") from e

    def write_json(self, key: str, obj: Any) -> None:
        """Write `obj` as JSON (sorted keys, indent 2) to `key`."""
        self.write_bytes(key, (json.dumps(obj, sort_keys=True, indent=2) + "\n").encode("utf-8"))

    def read_table(self, key: str) -> pa.Table:
        """Read the parquet table at `key`."""
        return pq.read_table(io.BytesIO(self.read_bytes(key)))

    def write_table(self, key: str, table: pa.Table | Mapping[str, list]) -> None:
        """Write a pyarrow table (or a column mapping) as parquet to `key`."""
        if not isinstance(table, pa.Table):
            table = pa.table(dict(table))
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        self.write_bytes(key, sink.getvalue().to_pybytes())

    def delete(self, key: str, missing_ok: bool = False) -> None:
        """Delete the object at `key`; FileNotFoundError if absent unless missing_ok."""
        if not self.exists(key):
            if missing_ok:
                return
            raise FileNotFoundError(f"cannot delete key {key!r}: no object at {self.url(key)}")
        self.fs.rm_file(self._path(key))
        self._fresh(self._path(key))

    def info(self, key: str) -> dict[str, Any]:
        """Size and a change token (S3 ETag+LastModified, local mtime+inode, memory created)."""
        path = self._path(key)
        self._fresh(path)
        try:
            raw = self.fs.info(path)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"no object at key {key!r} ({self.url(key)})") from e
        etag = raw.get("ETag") or raw.get("etag") or raw.get("md5Hash")
        stamp = raw.get("LastModified") or raw.get("updated") or raw.get("mtime") or raw.get("created")
        token = f"{etag}@{stamp}" if etag else f"{stamp}@{raw.get('ino', '')}"
        return {"key": key, "url": self.url(key), "size": int(raw["size"]), "etag": etag, "token": token}

    def sha256(self, key: str) -> str:
        """Hex SHA-256 of the object at `key` (streamed)."""
        digest = hashlib.sha256()
        with self.open(key, "rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                digest.update(chunk)
        return digest.hexdigest()


def current_umask() -> int:
    """The process umask: from /proc on Linux, else by setting it and restoring it at once."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def sweep_temporaries(store: ArtifactStore, max_age_s: float = 86400.0) -> list[str]:
    """Remove the temporary files that killed local writers left under the store; returns their paths.

    A temporary of this host whose writer process is gone is removed; one of another host (a shared file
    system) only once older than `max_age_s`; a live writer's is never touched."""
    if not store._local or not os.path.isdir(store._root):
        return []
    stale = []
    for folder, _, files in os.walk(store._root):
        stale += [os.path.join(folder, f) for f in files
                  if f.startswith(TMP_PREFIX) and _abandoned(folder, f, max_age_s)]
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return sorted(stale)


def _abandoned(folder: str, name: str, max_age_s: float) -> bool:
    host, _, rest = name[len(TMP_PREFIX):].partition("~")
    pid = rest.partition("~")[0]
    if host == _HOST and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    try:
        return time.time() - os.stat(os.path.join(folder, name)).st_mtime > max_age_s
    except FileNotFoundError:
        return False


def _fsync_dir(folder: str) -> None:
    """Persist a rename by syncing its folder (best effort where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
