"""distill.phases: one run in phases (DMD2 §5: DM + TTUR, then the GAN at a lower lr from those weights): the
config and its hashes, the settings in force at each step, exact resume across a boundary in a fresh process, and
resume keys that a later phase's change leaves valid for the checkpoints made before it began."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dmd_core.config import ConfigError, DistillConfig
from tasks.config import load_config
from tests.helpers import make_trainer

REPO = Path(__file__).resolve().parent.parent
LR_1, LR_2, LR_FAKE_2 = 1e-3, 2e-4, 3e-4
# Phase 1: DM + regression with TTUR 2 (make_trainer's), no GAN; phase 2: the GAN on, other rates, TTUR 1.
PHASES = [{"steps": 3}, {"steps": 3, "lr": LR_2, "lr_fake": LR_FAKE_2, "gan": {"enabled": True},
                         "fake_updates_per_generator": 1}]
TWO_PHASES = "distill.phases=[{steps: 2}, {steps: 2, lr: 5.0e-5, gan: {enabled: true, weight_generator: 1.0e-3}}]"


def phased_trainer():
    """tests.helpers.make_trainer (2-step G, EMA, regression) in the two PHASES, six steps in all."""
    return make_trainer(steps=6, lr=LR_1, gan={"enabled": False}, phases=PHASES)


# ---- config ---------------------------------------------------------------------------------
def test_phases_parse_and_resolve_per_step():
    d = load_config("digits-tiny", overrides=[TWO_PHASES]).distill
    assert d.phase_starts() == [0, 2] and [d.phase_index(s) for s in range(5)] == [0, 0, 1, 1, 1]
    assert d.gan_used and not d.gan.enabled
    first, second = d.phase_config(0), d.phase_config(1)
    assert (first.lr, first.gan.enabled) == (d.lr, False)
    assert (second.lr, second.gan.enabled, second.gan.weight_generator) == (5e-5, True, 1e-3)
    assert second.gan.weight_discriminator == d.gan.weight_discriminator and second.lambda_reg == d.lambda_reg
    assert d.model_dump(mode="json")["phases"][1] == {"steps": 2, "lr": 5e-5,
                                                      "gan": {"enabled": True, "weight_generator": 1e-3}}
    # a list item can be set from the command line
    d = load_config("digits-tiny", overrides=[TWO_PHASES, "distill.phases.1.lr=1e-6"]).distill
    assert d.phase_config(1).lr == 1e-6


@pytest.mark.parametrize("phases, field", [
    ("[{steps: 2}, {steps: 2, lr: 1.0e-6, momentum: 0.9}]", r"distill\.phases\[1\]: .*unknown key 'momentum'"),
    ("[{steps: 2}, {steps: 2, gan: {enabled: true, lr: 1}}]", r"distill\.phases\[1\]\.gan: .*unknown key 'lr'"),
    ("[{steps: 0}, {steps: 4}]", r"distill\.phases\[0\]\.steps: "),
    ("[{steps: 2}, {steps: 2, lr: -1}]", r"distill\.phases\[1\]\.lr: "),
    ("[{steps: 2}, {steps: 3}]", r"distill\.phases: .*sum to 5 but distill\.steps is 4"),
    ("[{lr: 1.0e-6}]", r"distill\.phases\[0\]\.steps: "),
])
def test_bad_phases_are_one_line_naming_the_field(phases, field):
    with pytest.raises(ConfigError, match=field) as err:
        load_config("digits-tiny", overrides=[f"distill.phases={phases}"])
    assert "\n" not in str(err.value)


def test_without_phases_dumps_and_hashes_as_before():
    from tasks.stages import config_resume_hash

    assert "phases" not in DistillConfig().model_dump()
    cfg = load_config("digits-tiny")
    assert cfg.distill.model_dump() == {k: v for k, v in cfg.distill.model_dump().items() if k != "phases"}
    # the values of the commit before distill.phases existed
    assert cfg.section_hash("distill") == "8b8cb583ffe0e0f2"
    assert config_resume_hash(cfg) == config_resume_hash(cfg, 3) == "0bde0f22e8eefb66"
    assert load_config("digits").section_hash("data", "teacher", "pairs", "distill", "export",
                                              "evaluate") == "373a053217875508"


# ---- trainer --------------------------------------------------------------------------------
def test_each_step_runs_with_its_phase_settings(one_thread):
    trainer = phased_trainer()
    assert trainer.gan_head is not None  # built at step 0 for the later phase
    head = {k: v.clone() for k, v in trainer.gan_head.state_dict().items()}
    real = trainer.real.state_dict()
    for step in range(6):
        m = trainer.train_step()
        phase, g_update = (0, step % 2 == 0) if step < 3 else (1, True)
        assert trainer.phase == phase
        assert ("loss_gan_D" in m) == (phase == 1) and ("loss_gan_G" in m) == (phase == 1)
        assert [g["lr"] for g in trainer.opt_fake.param_groups] == [LR_1 if phase == 0 else LR_FAKE_2]
        if g_update:
            assert [g["lr"] for g in trainer.opt_G.param_groups] == [LR_1 if phase == 0 else LR_2]
        assert ("loss_dm" in m) == g_update
        if step == 2:  # no GAN yet: the head untouched and no real image drawn
            assert all(torch.equal(v, head[k]) for k, v in trainer.gan_head.state_dict().items())
            assert trainer.real.state_dict() == real
    assert not all(torch.equal(v, head[k]) for k, v in trainer.gan_head.state_dict().items())
    assert trainer.base_cfg.generator_updates(6) == 2 + 3


RESUME_SCRIPT = """
import sys, torch
from pathlib import Path
from safetensors.torch import save_file
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
from tests.test_phases import phased_trainer
folder = Path(sys.argv[1])
for ckpt in ("before", "after"):
    trainer = phased_trainer()
    trainer.load_state_files({p.name: p.read_bytes() for p in (folder / ckpt).iterdir()})
    while trainer.step < 6:
        trainer.train_step()
    for name, module in (("G", trainer.G.denoiser), ("fake", trainer.mu_fake), ("ema", trainer.ema),
                         ("gan_head", trainer.gan_head)):
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(folder / f"{ckpt}-{name}.safetensors"))
"""


@pytest.fixture
def deterministic():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the resumed process runs
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_resume_before_and_after_the_boundary_is_bit_identical(tmp_path, deterministic):
    from safetensors.torch import load_file

    first = phased_trainer()
    for step, name in ((2, "before"), (4, "after")):  # the boundary is at step 3
        while first.step < step:
            first.train_step()
        (tmp_path / name).mkdir()
        for file, data in first.state_files().items():
            (tmp_path / name / file).write_bytes(data)
        assert json.loads((tmp_path / name / "trainer_state.json").read_text())["phase"] == {"before": 0, "after": 1}[name]
    del first
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", RESUME_SCRIPT, str(tmp_path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        straight = phased_trainer()
        for _ in range(6):
            straight.train_step()
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    for ckpt in ("before", "after"):
        for name, module in (("G", straight.G.denoiser), ("fake", straight.mu_fake), ("ema", straight.ema),
                             ("gan_head", straight.gan_head)):
            resumed = load_file(str(tmp_path / f"{ckpt}-{name}.safetensors"))
            assert resumed.keys() == module.state_dict().keys()
            for key, value in module.state_dict().items():
                assert torch.equal(resumed[key], value), f"{name}.{key} differs after resuming {ckpt} the boundary"


# ---- resume keys ----------------------------------------------------------------------------
def test_a_later_phase_change_keeps_only_the_earlier_checkpoints_keys():
    from tasks.stages import config_resume_hash

    cfg = load_config("digits-tiny", overrides=[TWO_PHASES])
    changed = load_config("digits-tiny", overrides=[TWO_PHASES, "distill.phases.1.lr=1e-6"])
    # phase 2 begins at step 2: the checkpoints at steps 1 and 2 hold phase 1's steps only
    assert [config_resume_hash(cfg, s) == config_resume_hash(changed, s) for s in (1, 2, 3, 4)] == \
        [True, True, False, False]
    assert config_resume_hash(cfg, 1) == config_resume_hash(cfg, 2) != config_resume_hash(cfg, 3)
    assert config_resume_hash(cfg) == config_resume_hash(cfg, 4)
    # lengthening the running phase (with distill.steps) continues it; moving a begun phase's start does not
    longer = load_config("digits-tiny", overrides=[TWO_PHASES, "distill.steps=6", "distill.phases.1.steps=4"])
    assert config_resume_hash(longer, 4) == config_resume_hash(cfg, 4)
    moved = load_config("digits-tiny", overrides=[TWO_PHASES, "distill.phases.0.steps=1", "distill.phases.1.steps=3"])
    assert config_resume_hash(moved, 1) == config_resume_hash(cfg, 1)
    assert config_resume_hash(moved, 2) != config_resume_hash(cfg, 2)


@pytest.fixture(scope="module")
def phased_run(tmp_path_factory, one_thread):
    """Teacher and pairs of `digits-tiny` in TWO_PHASES (the GAN on from step 2), a checkpoint every step."""
    from flows.pipeline import save_config
    from tasks.pairs import plan_pairs, record_shards, run_pairs_shard
    from tasks.teacher import run_teacher as make_teacher

    root = str(tmp_path_factory.mktemp("phases"))
    save_config(root, "r", load_config("digits-tiny", overrides=[TWO_PHASES, "distill.checkpoint_every=1"]))
    make_teacher(root, "r")
    todo, records = plan_pairs(root, "r")
    record_shards(root, "r", records + [run_pairs_shard(root, "r", i) for i in todo], complete=True)
    return root


def test_changing_phase_two_resumes_from_phase_one_checkpoints_only(phased_run, capsys):
    from storage.checkpoints import list_checkpoints, read_checkpoint
    from storage.layout import CONFIG
    from tasks.context import open_run
    from tasks.distill import build_trainer, resume, run_distill
    from tasks.stages import resumable_checkpoints, resume_key

    root = phased_run
    assert run_distill(root, "r") == 4
    store, cfg = open_run(root, "r")
    found = resumable_checkpoints(store, cfg)
    assert [s for s, _ in found] == [1, 2, 3, 4]
    assert found[1][1] == resume_key(store, cfg, 2) != found[2][1] == resume_key(store, cfg)
    state = json.loads(read_checkpoint(store, 3, found[2][1])["trainer_state.json"])
    assert (state["step"], state["phase"]) == (3, 1)

    data = cfg.model_dump(mode="json")
    data["distill"]["phases"][1]["lr"] = 1e-6
    store.write_json(CONFIG, data)
    store, cfg = open_run(root, "r")
    assert [s for s, _ in resumable_checkpoints(store, cfg)] == [1, 2]
    assert resume(store, build_trainer(store, cfg, torch.device("cpu")), cfg) == 2
    assert run_distill(root, "r") == 4
    assert [s for s, _ in resumable_checkpoints(store, cfg)] == [1, 2, 3, 4]
    assert resume_key(store, cfg) != found[-1][1]  # the old phase-2 checkpoints stay where they were
    assert list_checkpoints(store, found[-1][1]) == [3, 4]
