"""Distill after the pairs were regenerated with other bits (GPU pairs are not bit-stable): one line, then a fresh
distill under a new resume key with the old checkpoints untouched, or (distill.on_new_pairs=continue) the old
weights with the pair stream from its start."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dmd_core.config import DistillConfig

from tasks.config import load_config
from storage import read_manifest, write_shard
from storage.layout import CHECKPOINTS, PAIRS_MANIFEST, run_store
from storage.stream import read_shard

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def dmd_run(prefect_api: str, root: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_API_URL": prefect_api,
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-c", "from flows.cli import main; main()", "run", "--preset", "digits-tiny",
           "--root", root, "--run-name", "r", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def regenerate_pairs_with_other_bits(root: str, nudge: float) -> None:
    """What `--stages pairs --force` does on a GPU: the same config and shards, other output bits."""
    from tasks.pairs import record_shards

    store = run_store(root, "r")
    records = []
    for rec in read_manifest(store, PAIRS_MANIFEST):
        samples = [{"__key__": s["__key__"], "noise.npy": s["noise.npy"], "image.npy": s["image.npy"] + nudge,
                    "json": s["json"]} for s in read_shard(store, rec)]
        records.append(write_shard(store, rec.shard, samples, producer_hash=rec.producer_hash))
    record_shards(root, "r", records, complete=True)


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def said(out: subprocess.CompletedProcess, what: str) -> list[str]:
    return [line for line in (out.stdout + out.stderr).splitlines() if what in line]


def test_on_new_pairs_at_its_default_keeps_the_config_hashes():
    assert "on_new_pairs" not in DistillConfig().model_dump()
    base = load_config("digits-tiny")
    assert load_config("digits-tiny", overrides=["distill.on_new_pairs=restart"]).section_hash("distill") == \
        base.section_hash("distill")
    assert load_config("digits-tiny", overrides=["distill.on_new_pairs=continue"]).section_hash("distill") != \
        base.section_hash("distill")


def test_distill_after_new_pairs_restarts_under_a_new_key_or_continues(prefect_api, tmp_path):
    from tasks.context import open_run
    from tasks.stages import resume_key

    root, run = str(tmp_path), tmp_path / "r"
    first = dmd_run(prefect_api, root, "--stages", "teacher,pairs,distill")
    assert first.returncode == 0, first.stderr[-3000:]
    store, cfg = open_run(root, "r")
    key_1 = resume_key(store, cfg)
    assert sorted(p.name for p in (run / CHECKPOINTS).iterdir()) == ["step-00000002", "step-00000004"]
    before = files_under(run / CHECKPOINTS)

    regenerate_pairs_with_other_bits(root, 1e-3)
    key_2 = resume_key(store, cfg)
    assert key_2 != key_1 and key_2.split("-")[0] == key_1.split("-")[0]  # same config, other pairs
    again = dmd_run(prefect_api, root, "--stages", "distill")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Traceback" not in again.stdout + again.stderr
    lines = said(again, "the pairs changed")
    assert len(lines) == 1 and "starting from step 0" in lines[0] and "step 4" in lines[0], again.stdout[-3000:]
    after = files_under(run / CHECKPOINTS)
    assert {k: v for k, v in after.items() if not k.startswith(key_2)} == before  # untouched, in place
    fresh = {k for k in after if k.startswith(key_2)}
    assert {k.split("/")[1] for k in fresh} == {"step-00000002", "step-00000004"}
    marker = json.loads(after[f"{key_2}/step-00000004/_complete.json"])
    assert marker["hash"] == key_2
    assert after[f"{key_2}/step-00000004/generator.safetensors"] != before["step-00000004/generator.safetensors"]
    assert json.loads((run / "distill" / "_complete.json").read_text())["steps"] == 4

    regenerate_pairs_with_other_bits(root, 2e-3)
    key_3 = resume_key(store, cfg)
    cont = dmd_run(prefect_api, root, "--stages", "distill", "--set", "distill.on_new_pairs=continue",
                   "--set", "distill.steps=6")
    assert cont.returncode == 0, cont.stderr[-3000:]
    lines = said(cont, "the pairs changed")
    assert len(lines) == 1 and "continuing from step 4's weights" in lines[0], cont.stdout[-3000:]
    now = files_under(run / CHECKPOINTS)
    assert {k: v for k, v in now.items() if not k.startswith(key_3)} == after
    assert {k.split("/")[1] for k in now if k.startswith(key_3)} == {"step-00000004", "step-00000006"}
    # step 4 of the new set is the previous set's step 4 (weights, optimizer, EMA) with the streams restarted
    for name in ("generator.safetensors", "fake.safetensors", "ema.safetensors"):
        assert now[f"{key_3}/step-00000004/{name}"] == after[f"{key_2}/step-00000004/{name}"]
    state = json.loads(now[f"{key_3}/step-00000004/trainer_state.json"])
    assert state["step"] == 4 and state["pairs"]["position"] == 0 and state["pairs"]["epoch"] == 0
    assert json.loads(now[f"{key_2}/step-00000004/trainer_state.json"])["pairs"]["position"] != 0


def test_checkpoints_written_before_pairs_were_keyed_still_resume(prefect_api, tmp_path):
    """A run checkpointed when the resume key was the config hash alone resumes on the same pairs (no restart,
    no line about new pairs), continuing under the new key; the old checkpoints stay as they were."""
    from tasks.context import open_run
    from tasks.stages import config_resume_hash, resume_key

    root, run = str(tmp_path), tmp_path / "r"
    first = dmd_run(prefect_api, root, "--stages", "teacher,pairs,distill")
    assert first.returncode == 0, first.stderr[-3000:]
    store, cfg = open_run(root, "r")
    key, legacy = resume_key(store, cfg), config_resume_hash(cfg)
    for marker in (run / CHECKPOINTS).glob("step-*/_complete.json"):  # as the previous release wrote them
        marker.write_text(json.dumps({**json.loads(marker.read_text()), "hash": legacy}))
    before = files_under(run / CHECKPOINTS)

    again = dmd_run(prefect_api, root, "--stages", "distill", "--set", "distill.steps=6")
    assert again.returncode == 0, again.stderr[-3000:]
    assert not said(again, "the pairs changed"), again.stdout[-3000:]
    after = files_under(run / CHECKPOINTS)
    assert {k: v for k, v in after.items() if not k.startswith(key)} == before
    assert {k.split("/")[1] for k in after if k.startswith(key)} == {"step-00000004", "step-00000006"}
    for name in ("generator.safetensors", "fake.safetensors", "ema.safetensors"):
        assert after[f"{key}/step-00000004/{name}"] == before[f"step-00000004/{name}"]
