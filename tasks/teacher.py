"""Stage `teacher`: put the teacher (diffusers UNet2DModel + scheduler) into the run's store."""
from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from dmd_core.digits import load_digits, train_teacher
from storage.layout import TEACHER
from storage.models import save_folder
from tasks.context import is_done, mark_done, open_run, unmark_done

SHIPPED = Path(__file__).resolve().parent.parent / "teachers"


def shipped_teacher(key: str) -> Path | None:
    """A teacher folder shipped in the repo whose `dmd_teacher.json` records this config hash."""
    for meta in sorted(SHIPPED.glob("*/dmd_teacher.json")):
        if json.loads(meta.read_text()).get("hash") == key:
            return meta.parent
    return None


def _copy_tree(src: Path, dst: str) -> None:
    for path in sorted(src.rglob("*")):
        if path.is_file() and path.name != "dmd_teacher.json":
            target = Path(dst) / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())


def _copy_local_teacher(src: Path, dst: str) -> None:
    """Accept `unet/` + `scheduler/` subfolders or a flat UNet folder with scheduler_config.json."""
    if (src / "unet").is_dir():
        _copy_tree(src, dst)
        return
    for name in ("config.json", "scheduler_config.json"):
        if not (src / name).is_file():
            raise FileNotFoundError(f"teacher.path: {src / name} not found (need a diffusers UNet2DModel folder)")
    weights = sorted(src.glob("diffusion_pytorch_model*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"teacher.path: no diffusion_pytorch_model*.safetensors in {src}")
    for f in [src / "config.json", *weights]:
        (Path(dst) / "unet").mkdir(parents=True, exist_ok=True)
        (Path(dst) / "unet" / f.name).write_bytes(f.read_bytes())
    (Path(dst) / "scheduler").mkdir(parents=True, exist_ok=True)
    (Path(dst) / "scheduler" / "scheduler_config.json").write_bytes((src / "scheduler_config.json").read_bytes())


def run_teacher(root: str, run_name: str, force: bool = False) -> str:
    """Copy a local or shipped teacher, or train one on digits; skipped when already done for this config."""
    store, cfg = open_run(root, run_name)
    key = cfg.section_hash("data", "teacher")
    if not force and is_done(store, "teacher", key):
        return "cached"
    unmark_done(store, "teacher")
    if cfg.teacher.source == "path":
        src, how = Path(cfg.teacher.path).expanduser(), "path"
        if not src.is_dir():
            raise FileNotFoundError(f"teacher.path: folder {src} not found")
        save_folder(store, TEACHER, lambda tmp: _copy_local_teacher(src, tmp))
    elif (src := shipped_teacher(key)) is not None and not force:
        how = f"shipped:{src.name}"
        save_folder(store, TEACHER, lambda tmp: _copy_tree(src, tmp))
    else:
        if cfg.data.name != "digits":
            raise ValueError(f"teacher.source=train needs data.name=digits, got {cfg.data.name!r}")
        images, labels = load_digits()
        unet, scheduler = train_teacher(cfg.data, cfg.teacher, images, labels)
        how = "trained"
        save_folder(store, TEACHER, lambda tmp: (unet.save_pretrained(f"{tmp}/unet"),
                                                  scheduler.save_pretrained(f"{tmp}/scheduler")))
    mark_done(store, "teacher", key, source=how)
    return how


@task(name="teacher", cache_policy=NONE, persist_result=False)
def teacher_task(root: str, run_name: str, force: bool = False) -> str:
    """Prefect wrapper of run_teacher."""
    return run_teacher(root, run_name, force)
