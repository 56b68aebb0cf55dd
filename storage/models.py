"""Model folders (diffusers `save_pretrained` layouts) in the artifact store."""
from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator

from storage.store import ArtifactStore

_CACHE: dict[str, str] = {}
_CACHE_LOCK = threading.Lock()


def save_folder(store: ArtifactStore, prefix: str, write: Callable[[str], None]) -> list[str]:
    """Call write(local_dir) and upload every file it produced under `prefix/`; returns the keys written."""
    keys = []
    with tempfile.TemporaryDirectory(prefix="dmd-save-") as tmp:
        write(tmp)
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file():
                key = f"{prefix}/{path.relative_to(tmp).as_posix()}"
                store.write_bytes(key, path.read_bytes())
                keys.append(key)
    if not keys:
        raise ValueError(f"nothing was written for {store.url(prefix)}")
    return keys


def _download(store: ArtifactStore, prefix: str, target: str) -> None:
    keys = store.ls(prefix)
    if not keys:
        raise FileNotFoundError(f"no files under {store.url(prefix)}")
    for key in keys:
        path = Path(target) / key[len(prefix):].lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        with store.open(key, "rb") as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)


@contextlib.contextmanager
def local_folder(store: ArtifactStore, prefix: str) -> Iterator[str]:
    """`prefix/` of the store as a local folder: the folder itself on file://, else a temporary copy."""
    if store.root_url.startswith("file://"):
        path = store.url(prefix)[len("file://"):]
        if not os.path.isdir(path) or not store.ls(prefix):
            raise FileNotFoundError(f"no files under {store.url(prefix)}")
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="dmd-load-") as tmp:
        _download(store, prefix, tmp)
        yield os.fspath(tmp)


def cached_folder(store: ArtifactStore, prefix: str, content_key: str) -> str:
    """`prefix/` as a local folder, copied out of a remote store once per process and content (e.g. a 4 GB
    teacher read by every stage); local stores are used in place. The copies are removed at exit."""
    if store.root_url.startswith("file://"):
        with local_folder(store, prefix) as path:
            return path
    cache_key = f"{store.url(prefix)}#{content_key}"
    with _CACHE_LOCK:
        if cache_key not in _CACHE:
            tmp = tempfile.mkdtemp(prefix="dmd-cache-")
            atexit.register(shutil.rmtree, tmp, True)
            try:
                _download(store, prefix, tmp)
            except BaseException:
                shutil.rmtree(tmp, True)
                raise
            _CACHE[cache_key] = tmp
        return _CACHE[cache_key]


def cached_file(url: str) -> str:
    """A local path for a file given as a path or any fsspec URL (remote files copied once per process)."""
    if "://" not in url or url.startswith("file://"):
        return url.removeprefix("file://")
    with _CACHE_LOCK:
        if url not in _CACHE:
            from storage.store import open_url

            tmp = tempfile.mkdtemp(prefix="dmd-cache-")
            atexit.register(shutil.rmtree, tmp, True)
            target = os.path.join(tmp, url.rstrip("/").rsplit("/", 1)[-1])
            try:
                with open_url(url, "rb") as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
            except BaseException:
                shutil.rmtree(tmp, True)
                raise
            _CACHE[url] = target
        return _CACHE[url]
