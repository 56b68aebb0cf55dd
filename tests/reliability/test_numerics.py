"""Numerics: NaN/inf injected into a pair batch or a loss is skipped and counted; after
distill.max_consecutive_nonfinite in a row training stops, naming the last good checkpoint, which stays intact."""
import json
import math
import shutil

import pytest
import torch

import dmd_core.trainer as trainer_module
import tasks.distill
from dmd_core.trainer import NonFiniteError
from tests.reliability.harness import files

pytestmark = pytest.mark.slow


class Poisoned:
    """A pair stream whose batches at the chosen trainer steps carry NaN targets and inf noise."""

    def __init__(self, stream, trainer, bad_steps):
        self.stream, self.trainer, self.bad_steps = stream, trainer, bad_steps

    def next_batch(self, device):
        batch = self.stream.next_batch(device)
        if self.trainer.step in self.bad_steps:
            batch = {**batch, "y": torch.full_like(batch["y"], math.nan), "z": torch.full_like(batch["z"], math.inf)}
        return batch

    def __getattr__(self, name):
        return getattr(self.stream, name)


@pytest.fixture
def run(baseline, tmp_path, monkeypatch):
    """A copy of the finished tiny run asked to train on to `steps` (a resumable change): (root, folder, set)."""
    _, source, _, _ = baseline
    folder = tmp_path / "crash"
    shutil.copytree(source, folder)
    (folder / "distill" / "_complete.json").unlink()

    def set_steps(steps):
        config = json.loads((folder / "config.json").read_text())
        config["distill"]["steps"] = steps
        (folder / "config.json").write_text(json.dumps(config))

    return str(tmp_path), folder, set_steps


def poison(monkeypatch, bad_steps):
    build = tasks.distill.build_trainer

    def poisoned_build(store, cfg, device):
        trainer = build(store, cfg, device)
        trainer.pairs = Poisoned(trainer.pairs, trainer, bad_steps)
        return trainer

    monkeypatch.setattr(tasks.distill, "build_trainer", poisoned_build)


def finite_weights(folder):
    from safetensors.torch import load_file

    return all(bool(torch.isfinite(t).all()) for p in folder.rglob("*.safetensors") for t in load_file(p).values())


def test_nonfinite_batches_and_losses_are_skipped_and_counted(run, monkeypatch, one_thread):
    root, folder, set_steps = run
    set_steps(8)
    poison(monkeypatch, {4})  # a batch: NaN targets, inf noise
    now, real_dm_loss, real_step = {}, trainer_module.dm_loss, trainer_module.DMDTrainer.train_step

    def dm_loss(*args, **kwargs):  # a loss: the distribution matching loss is inf at step 6
        loss, extra = real_dm_loss(*args, **kwargs)
        return (loss * math.inf if now["step"] == 6 else loss), extra

    def train_step(self):
        now["step"] = self.step
        now["calls"] = now.get("calls", 0) + 1
        return real_step(self)

    monkeypatch.setattr(trainer_module, "dm_loss", dm_loss)
    monkeypatch.setattr(trainer_module.DMDTrainer, "train_step", train_step)
    assert tasks.distill.run_distill(root, "crash") == 8
    marker = json.loads((folder / "distill" / "_complete.json").read_text())
    assert marker["nonfinite_skipped"] == 2 and now["calls"] == 4
    assert finite_weights(folder / "distill" / "checkpoints")


def test_consecutive_nonfinite_steps_stop_training_with_the_last_checkpoint_intact(run, monkeypatch, one_thread):
    root, folder, set_steps = run
    set_steps(30)
    checkpoint_4 = files(folder / "distill" / "checkpoints" / "step-00000004")
    poison(monkeypatch, set(range(4, 30)))
    with pytest.raises(NonFiniteError) as err:
        tasks.distill.run_distill(root, "crash")
    message = str(err.value)
    assert "10 consecutive non-finite steps" in message and "distill.max_consecutive_nonfinite=10" in message
    assert "last good checkpoint: step 12" in message
    assert files(folder / "distill" / "checkpoints" / "step-00000004") == checkpoint_4
    assert not (folder / "distill" / "_complete.json").exists()
    assert finite_weights(folder / "distill" / "checkpoints")
