"""Trainer engine: exact resume in a fresh process, the non-finite guard, TTUR and EMA."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dmd_core.streams import TensorStream
from dmd_core.trainer import NonFiniteError
from tests.helpers import make_trainer

REPO = Path(__file__).resolve().parent.parent
N = 3

RESUME_SCRIPT = """
import sys, torch
from pathlib import Path
from safetensors.torch import save_file
torch.use_deterministic_algorithms(True)
torch.set_num_threads(int(sys.argv[3]))  # CPU kernels split work by thread count: match the parent's
from tests.helpers import make_trainer
folder = Path(sys.argv[1])
trainer = make_trainer()
trainer.load_state_files({p.name: p.read_bytes() for p in (folder / "ckpt").iterdir()})
for _ in range(int(sys.argv[2])):
    trainer.train_step()
save_file({k: v.contiguous() for k, v in trainer.G.denoiser.state_dict().items()}, str(folder / "G.safetensors"))
save_file({k: v.contiguous() for k, v in trainer.mu_fake.state_dict().items()}, str(folder / "fake.safetensors"))
save_file({k: v.contiguous() for k, v in trainer.ema.state_dict().items()}, str(folder / "ema.safetensors"))
"""


@pytest.fixture
def deterministic():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.mark.slow
def test_resume_in_fresh_process_is_exact(tmp_path, deterministic):
    from safetensors.torch import load_file

    straight = make_trainer()
    for _ in range(2 * N):
        straight.train_step()

    first = make_trainer()
    for _ in range(N):
        first.train_step()
    (tmp_path / "ckpt").mkdir()
    for name, data in first.state_files().items():
        (tmp_path / "ckpt" / name).write_bytes(data)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", RESUME_SCRIPT, str(tmp_path), str(N), str(torch.get_num_threads())],
                   cwd=REPO, env=env, check=True)

    for name, module in (("G", straight.G.denoiser), ("fake", straight.mu_fake), ("ema", straight.ema)):
        resumed = load_file(str(tmp_path / f"{name}.safetensors"))
        for key, value in module.state_dict().items():
            assert torch.equal(resumed[key], value), f"{name}.{key} differs after resume"
    # And the weights did move: a resume that restored nothing would fail above, not pass trivially.
    assert not torch.equal(straight.G.denoiser.state_dict()["net.conv_in.weight"],
                           make_trainer().G.denoiser.state_dict()["net.conv_in.weight"])


class NaNOnce(TensorStream):
    """A pair stream whose second batch carries a NaN target."""

    calls = 0

    def next_batch(self, device="cpu"):
        batch = super().next_batch(device)
        NaNOnce.calls += 1
        if NaNOnce.calls == 2:
            batch["y"] = batch["y"].clone()
            batch["y"][0, 0, 0, 0] = float("nan")
        return batch


def test_nan_batch_is_skipped_counted_and_training_continues():
    NaNOnce.calls = 0
    trainer = make_trainer(stream_cls=NaNOnce, fake_updates_per_generator=1, gan={"enabled": False})
    trainer.train_step()  # first regression batch: finite
    before = {k: v.clone() for k, v in trainer.G.denoiser.state_dict().items()}
    fake_before = {k: v.clone() for k, v in trainer.mu_fake.state_dict().items()}
    m = trainer.train_step()  # second batch has the NaN
    assert m["skipped"] and trainer.nonfinite_skipped == 1
    for k, v in trainer.G.denoiser.state_dict().items():
        assert torch.equal(v, before[k])
    for k, v in trainer.mu_fake.state_dict().items():
        assert torch.equal(v, fake_before[k])
    m = trainer.train_step()
    assert not m["skipped"] and trainer.nonfinite_skipped == 1 and trainer.consecutive_nonfinite == 0
    assert any(not torch.equal(v, before[k]) for k, v in trainer.G.denoiser.state_dict().items())


def test_too_many_consecutive_nonfinite_steps_abort():
    class AlwaysNaN(TensorStream):
        def next_batch(self, device="cpu"):
            batch = super().next_batch(device)
            return {**batch, "y": torch.full_like(batch["y"], float("nan"))}

    trainer = make_trainer(stream_cls=AlwaysNaN, gan={"enabled": False}, fake_updates_per_generator=1,
                           max_consecutive_nonfinite=3)
    trainer.train_step()
    trainer.train_step()
    with pytest.raises(NonFiniteError, match="3 consecutive"):
        trainer.train_step()


def test_ttur_updates_generator_every_kth_step_and_ema_follows():
    trainer = make_trainer(fake_updates_per_generator=3, gan={"enabled": False})
    updated = ["loss_G" in trainer.train_step() for _ in range(6)]
    assert updated == [True, False, False, True, False, False]
    # EMA after 2 generator updates with decay d: ema = theta0 + (1 - d^k)-weighted moves; it lies strictly
    # between the initial and the current weights for a parameter that moved.
    init = make_trainer().G.denoiser.state_dict()["net.conv_in.weight"]
    cur = trainer.G.denoiser.state_dict()["net.conv_in.weight"]
    ema = trainer.ema.state_dict()["net.conv_in.weight"]
    assert (ema - init).norm() < (cur - init).norm() and not torch.equal(ema, init)


def test_plain_callable_teacher_needs_trainable_modules():
    from dmd_core.config import DistillConfig
    from dmd_core.processes import VPDiscrete
    from dmd_core.trainer import DMDTrainer

    with pytest.raises(TypeError, match="generator_init"):
        DMDTrainer(DistillConfig(regression="none"), lambda x, t, c: x, VPDiscrete.linear(), (2,),
                   prediction_type="sample")


def test_callable_teacher_states_its_prediction_type():
    from dmd_core.config import DistillConfig
    from dmd_core.processes import VPDiscrete
    from dmd_core.trainer import DMDTrainer

    net = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="prediction_type"):
        DMDTrainer(DistillConfig(regression="none"), lambda x, t, c: x, VPDiscrete.linear(), (2,),
                   generator_init=net, fake_init=net)


def test_plain_function_where_a_module_is_needed_is_a_type_error():
    from dmd_core.config import DistillConfig
    from dmd_core.trainer import DMDTrainer
    from tests.helpers import tiny_teacher

    teacher = tiny_teacher()
    with pytest.raises(TypeError, match="fake_init.*function"):
        DMDTrainer(DistillConfig(regression="none"), teacher, teacher.process, (1, 8, 8),
                   fake_init=lambda x, t, c: x)


def test_frozen_fake_score_needs_no_parameters():
    """The real-score-only ablation (DMD Fig. 3a): a fake score with no trainable parameters trains G alone."""
    from dmd_core.config import DistillConfig
    from dmd_core.trainer import DMDTrainer
    from tests.helpers import tiny_teacher

    teacher = tiny_teacher()

    class Frozen(torch.nn.Module):
        def forward(self, x_t, t, cond=None):
            return x_t / teacher.process.alpha(t, x_t)

    trainer = DMDTrainer(DistillConfig(regression="none", batch_size=4), teacher, teacher.process, (1, 8, 8),
                         num_classes=10, null_cond=10, fake_init=Frozen())
    before = {k: v.clone() for k, v in trainer.G.denoiser.state_dict().items()}
    m = trainer.train_step()
    assert trainer.opt_fake is None and "loss_fake" not in m and not m["skipped"]
    assert any(not torch.equal(before[k], v) for k, v in trainer.G.denoiser.state_dict().items())
    assert "optim_fake.json" not in trainer.state_files()


def test_reg_batch_size_must_match_the_pair_stream():
    with pytest.raises(ValueError, match="reg_batch_size=16"):
        make_trainer(reg_batch_size=16)
