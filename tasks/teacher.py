"""Stage `teacher`: put the teacher folder into the run's store (copied, shipped or trained here)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from dmd_core.config import resolve_path, stable_hash
from dmd_core.datasets import real_dataset
from dmd_core.digits import train_teacher
from dmd_core.families import family
from storage.layout import TEACHER
from storage.models import save_folder
from tasks.context import open_run
from tasks.stages import TEACHER_STAGE

SHIPPED = Path(__file__).resolve().parent.parent / "teachers"
SKIP = {"dmd_teacher.json"}
SKIP_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx")  # pickled or other frameworks


def shipped_teacher(key: str) -> Path | None:
    """A teacher folder shipped in the repo whose `dmd_teacher.json` records this config hash."""
    for meta in sorted(SHIPPED.glob("*/dmd_teacher.json")):
        if json.loads(meta.read_text()).get("hash") == key:
            return meta.parent
    return None


def _variant(name: str) -> bool:
    """A weight variant a loader never reads (`*.fp16.safetensors`, `*.non_ema.safetensors`)."""
    return name.endswith(".safetensors") and name.count(".") > 1


def teacher_files(src: Path, kind: str) -> dict[str, Path]:
    """Relative path in the run's teacher/ folder -> source file: the components the family of `kind` reads
    (`TeacherFamily.select_files`), without weight variants, other frameworks' or pickled weights, or single-file
    checkpoints."""
    files = {p.relative_to(src).as_posix(): p for p in sorted(src.rglob("*"))
             if p.is_file() and p.name not in SKIP and not p.name.endswith(SKIP_SUFFIXES) and not _variant(p.name)
             and not any(part.startswith(".") for part in p.relative_to(src).parts)}
    return files if kind == "callable" else family(kind).select_files(src, files)


def _copy(files: dict[str, Path], dst: str) -> dict[str, str]:
    digests = {}
    for rel, path in files.items():
        target = Path(dst) / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        data = path.read_bytes()
        target.write_bytes(data)
        digests[rel] = hashlib.sha256(data).hexdigest()
    return digests


def run_teacher(root: str, run_name: str, force: bool = False) -> str:
    """Copy a local or shipped teacher, or train one on a named dataset; skipped when done for this config."""
    store, cfg = open_run(root, run_name)
    key = TEACHER_STAGE.key(cfg)
    if not force and TEACHER_STAGE.is_done(store, cfg):
        return "cached"
    TEACHER_STAGE.unmark(store)
    t, digests = cfg.teacher, {}
    if t.kind == "callable" and t.source != "path":
        how = "callable"
    elif t.source == "path":
        src, how = Path(resolve_path(t.path)), "path"
        if not src.is_dir():
            raise FileNotFoundError(f"teacher.path: folder {src} not found")
        files = teacher_files(src, t.kind)
        save_folder(store, TEACHER, lambda tmp: digests.update(_copy(files, tmp)))
    elif (src := shipped_teacher(key)) is not None and not force:
        how = f"shipped:{src.name}"
        files = teacher_files(src, t.kind)
        save_folder(store, TEACHER, lambda tmp: digests.update(_copy(files, tmp)))
    else:
        dataset = real_dataset(cfg.data.name)
        if dataset is None:
            raise ValueError(f"teacher.source=train needs a named dataset (data.name), got {cfg.data.name!r}")
        unet, scheduler = train_teacher(cfg.data, t, *dataset)
        how = "trained"

        def write(tmp: str) -> None:
            unet.save_pretrained(f"{tmp}/unet")
            scheduler.save_pretrained(f"{tmp}/scheduler")
            digests.update({p.relative_to(tmp).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                            for p in Path(tmp).rglob("*") if p.is_file()})

        save_folder(store, TEACHER, write)
    TEACHER_STAGE.mark(store, cfg, source=how, content=stable_hash(digests))
    return how


@task(name="teacher", cache_policy=NONE, persist_result=False)
def teacher_task(root: str, run_name: str, force: bool = False) -> str:
    """Prefect wrapper of run_teacher."""
    return run_teacher(root, run_name, force)
