"""LoRA students: G and the fake score as two adapters over one frozen base (the teacher with adapters off)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from dmd_core.adapters import EMA, FAKE, GENERATOR, AdapterDenoiser, lora_layers, merged_state_dict, target_names
from dmd_core.config import DistillConfig
from tests.helpers import make_trainer, tiny_teacher

REPO = Path(__file__).resolve().parent.parent
LORA = dict(lora_rank=4, lr=2e-2)


def base_of(trainer):
    return trainer.G.denoiser.base


def test_one_shared_base_frozen_with_three_adapters():
    trainer = make_trainer(**LORA)
    base = base_of(trainer)
    assert trainer.mu_fake.base is base and trainer.ema.base is base
    assert trainer.teacher_denoiser.base is base  # the real score is the same network, adapters off
    layers = lora_layers(base)
    assert layers and all(set(layer.lora_A) == {GENERATOR, FAKE, EMA} for layer in layers)
    assert not any(p.requires_grad for n, p in base.named_parameters() if ".lora_" not in n)
    trainable = {id(p) for p in trainer.G.denoiser.parameters()} | {id(p) for p in trainer.mu_fake.parameters()}
    lora = {id(p) for n, p in base.named_parameters() if f".{GENERATOR}." in n or f".{FAKE}." in n}
    assert trainable == lora
    n_full = sum(p.numel() for n, p in base.named_parameters() if ".lora_" not in n)
    n_G = sum(p.numel() for p in trainer.G.denoiser.parameters())
    assert 0 < n_G < n_full / 4
    # Every default target of the tiny UNet is adapted: convolutions, time embedding projections.
    names = target_names(tiny_teacher(), list(base.backbone.lora_targets))
    assert any(n.endswith("conv1") for n in names) and any(n.endswith("time_emb_proj") for n in names)


def test_training_moves_the_adapters_and_leaves_the_teacher_alone():
    torch.manual_seed(0)
    reference = tiny_teacher()
    trainer = make_trainer(**LORA)
    x, t = torch.randn(4, 1, 8, 8), torch.full((4,), 0.5)
    c = torch.randint(0, 10, (4,))
    ema_before = {k: v.clone() for k, v in trainer.ema.state_dict().items()}
    for _ in range(4):
        trainer.train_step()
    with torch.no_grad():
        teacher_out = trainer.teacher_denoiser(x, t, c)
        assert torch.equal(teacher_out, reference(x, t, c))  # frozen base, adapters off
        assert not torch.allclose(trainer.G.denoiser(x, t, c), teacher_out, atol=1e-4)
        assert not torch.allclose(trainer.mu_fake(x, t, c), teacher_out, atol=1e-4)
        assert not torch.allclose(trainer.G.denoiser(x, t, c), trainer.mu_fake(x, t, c), atol=1e-4)
    assert any(not torch.equal(ema_before[k], v) for k, v in trainer.ema.state_dict().items())
    # The base is left adapters-off after every role's call.
    assert all(layer.disable_adapters for layer in lora_layers(base_of(trainer)))


def test_ema_starts_at_the_generator_and_holds_adapter_weights_only():
    trainer = make_trainer(**LORA)
    G, ema = trainer.G.denoiser.state_dict(), trainer.ema.state_dict()
    assert G.keys() == ema.keys() and all(".lora_" in k.replace(":", ".") for k in G)
    assert all(torch.equal(G[k], ema[k]) for k in G)


def test_merged_weights_equal_the_adapter_forward_and_the_closed_form():
    """merged W' = W + (alpha / r) B A, checked on one layer by hand and on the whole net by its forward."""
    trainer = make_trainer(lora_rank=4, lora_alpha=8.0, lr=2e-2)
    for _ in range(3):
        trainer.train_step()
    weights = {k: v.clone() for k, v in trainer.G.denoiser.state_dict().items()}
    teacher = tiny_teacher()
    merged = merged_state_dict(teacher, weights, 4, 8.0, None)
    assert merged.keys() == teacher.state_dict().keys()
    key = "net:down_blocks:0:resnets:0:time_emb_proj"
    A, B = weights[f"adapter.{key}:lora_A:weight"], weights[f"adapter.{key}:lora_B:weight"]
    W = teacher.state_dict()["net.down_blocks.0.resnets.0.time_emb_proj.weight"]
    assert B.abs().max() > 0
    torch.testing.assert_close(merged["net.down_blocks.0.resnets.0.time_emb_proj.weight"], W + 2.0 * B @ A)
    student = tiny_teacher()
    student.load_state_dict(merged)
    x, t, c = torch.randn(4, 1, 8, 8), torch.full((4,), 0.3), torch.randint(0, 10, (4,))
    with torch.no_grad():
        torch.testing.assert_close(student(x, t, c), trainer.G.denoiser(x, t, c), atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_recomputes_under_the_forward_adapter():
    """With a shared base, backward's recomputation must run the adapter of its forward, not the one active then."""
    plain, checkpointed = make_trainer(**LORA), make_trainer(gradient_checkpointing=True, **LORA)
    for _ in range(3):
        plain.train_step()
        checkpointed.train_step()
    for a, b in ((plain.G.denoiser, checkpointed.G.denoiser), (plain.mu_fake, checkpointed.mu_fake)):
        for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(v, w, atol=1e-5, rtol=1e-4, msg=k)


def test_under_autocast_the_adapters_take_the_bf16_input_as_it_is():
    """peft copies every adapted layer's input to the adapter's fp32; under autocast the switch turns that off (the
    matmul is cast by autocast) and the forward agrees with peft's cast path; outside autocast the input is cast."""
    trainer = make_trainer(**LORA)
    for _ in range(2):
        trainer.train_step()
    G, base = trainer.G.denoiser, base_of(trainer)
    for n, p in base.named_parameters():  # a bf16 base, fp32 adapters: as LoRA students are held on CUDA
        p.data = p.data if ".lora_" in n else p.data.bfloat16()
    seen = []
    hooks = [layer.lora_A[GENERATOR].register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
             for layer in lora_layers(base)]
    x, t, c = torch.randn(4, 1, 8, 8, dtype=torch.bfloat16), torch.full((4,), 0.3), torch.randint(0, 10, (4,))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast = G(x, t, c)
        assert seen and set(seen) == {torch.bfloat16}
        seen.clear()
        for layer in lora_layers(base):  # peft's own path: the input copied to fp32 first
            layer.cast_input_dtype_enabled = True
        with G.switch.using(GENERATOR):
            G.switch.activate(GENERATOR, autocast=False)
            cast = G.base(x, t, c)
        assert set(seen) == {torch.float32}
    torch.testing.assert_close(fast.float(), cast.float(), atol=2e-2, rtol=2e-2)
    seen.clear()
    with torch.no_grad():
        G(x, t, c)  # no autocast: bf16 input, fp32 adapter; peft's cast keeps the matmul in one dtype
    assert set(seen) == {torch.float32}
    for h in hooks:
        h.remove()


def test_an_adapter_of_a_given_init_is_its_own_base():
    from dmd_core.config import DistillConfig
    from dmd_core.streams import TensorStream
    from dmd_core.trainer import DMDTrainer

    teacher, fake_init = tiny_teacher(), tiny_teacher(seed=3)
    tensors = {"z": torch.randn(16, 1, 8, 8), "y": torch.rand(16, 1, 8, 8), "cond": torch.randint(0, 10, (16,))}
    trainer = DMDTrainer(DistillConfig(batch_size=8, lora_rank=2, regression="mse"), teacher, teacher.process,
                         (1, 8, 8), num_classes=10, null_cond=10, pairs=TensorStream(tensors, 8, seed=1),
                         fake_init=fake_init, device="cpu")
    assert isinstance(trainer.mu_fake, AdapterDenoiser) and trainer.mu_fake.base is fake_init
    assert trainer.G.denoiser.base is teacher
    assert {FAKE} == set(lora_layers(fake_init)[0].lora_A)
    trainer.train_step()


def test_a_guided_lora_student_learns_w_and_merges_into_the_guided_student():
    """guidance_range with LoRA: one guided base (the teacher without w), whose zero guidance projection G's and the
    fake score's adapters adapt; the merged student (guided architecture) equals G's forward at every w."""
    from types import SimpleNamespace

    from dmd_core.guidance import student_cond, student_denoiser

    torch.manual_seed(0)
    reference = tiny_teacher()
    trainer = make_trainer(lora_rank=4, lr=2e-2, guidance_range=(1.0, 3.0), gan={"enabled": False})
    for _ in range(4):
        trainer.train_step()
    G, base = trainer.G.denoiser, base_of(trainer)
    assert trainer.mu_fake.base is base and trainer.teacher_denoiser.base is base
    proj = [n for n, _ in G.named_parameters() if "cond_proj" in n.replace(":", ".")]
    assert proj  # the guidance projection is adapted, not trained in full
    x, t, c = torch.randn(4, 1, 8, 8), torch.full((4,), 0.5), torch.randint(0, 10, (4,))
    w1, w3 = torch.full((4,), 1.0), torch.full((4,), 3.0)
    with torch.no_grad():
        assert torch.equal(trainer.teacher_denoiser(x, t, c), reference(x, t, c))  # no w: the teacher
        out1, out3 = G(x, t, student_cond(G, c, w1)), G(x, t, student_cond(G, c, w3))
        assert not torch.allclose(out1, out3, atol=1e-4)  # G depends on w
        weights = {k: v.clone() for k, v in G.state_dict().items()}
        d = SimpleNamespace(lora_rank=4, lora_alpha=None, lora_targets=None, guidance_range=(1.0, 3.0),
                            guidance_embedding_dim=trainer.cfg.guidance_embedding_dim)
        holder = SimpleNamespace(denoiser=reference)
        student = student_denoiser(holder, weights, d)
        for w, out in ((w1, out1), (w3, out3)):
            torch.testing.assert_close(student(x, t, student_cond(student, c, w)), out, atol=1e-5, rtol=1e-5)
    # the guided base also recomputes its blocks under the forward's adapter
    checkpointed = make_trainer(lora_rank=4, lr=2e-2, guidance_range=(1.0, 3.0), gan={"enabled": False},
                                gradient_checkpointing=True)
    checkpointed.train_step()
    plain = make_trainer(lora_rank=4, lr=2e-2, guidance_range=(1.0, 3.0), gan={"enabled": False})
    plain.train_step()
    for (k, v), u in zip(plain.G.denoiser.state_dict().items(), checkpointed.G.denoiser.state_dict().values()):
        torch.testing.assert_close(v, u, atol=1e-5, rtol=1e-4, msg=k)


def test_a_second_lora_trainer_on_an_adapted_teacher_is_refused():
    from dmd_core.config import DistillConfig
    from dmd_core.trainer import DMDTrainer

    teacher = tiny_teacher()
    cfg = DistillConfig(batch_size=4, lora_rank=2, regression="none")
    DMDTrainer(cfg, teacher, teacher.process, (1, 8, 8), num_classes=10, null_cond=10, device="cpu")
    with pytest.raises(ValueError, match="already holds LoRA adapters"):
        DMDTrainer(cfg, teacher, teacher.process, (1, 8, 8), num_classes=10, null_cond=10, device="cpu")


@pytest.mark.parametrize("fields, message", [
    (dict(lora_alpha=8.0), "lora_rank"),
    (dict(lora_targets=["to_q"]), "lora_rank"),
    (dict(lora_rank=-1), "lora_rank"),
])
def test_config_refuses_inconsistent_lora_fields(fields, message):
    with pytest.raises(ValidationError, match=message):
        DistillConfig(**fields)


def test_lora_fields_at_their_defaults_leave_the_config_dump_unchanged():
    dump = DistillConfig().model_dump()
    assert not {"lora_rank", "lora_alpha", "lora_targets"} & set(dump)
    assert DistillConfig(lora_rank=4).model_dump()["lora_rank"] == 4


RESUME_SCRIPT = """
import json, sys, torch
from pathlib import Path
from safetensors.torch import save_file
torch.use_deterministic_algorithms(True)
torch.set_num_threads(int(sys.argv[3]))
from tests.helpers import make_trainer
folder = Path(sys.argv[1])
trainer = make_trainer(**json.loads(sys.argv[4]))
trainer.load_state_files({p.name: p.read_bytes() for p in (folder / "ckpt").iterdir()})
for _ in range(int(sys.argv[2])):
    trainer.train_step()
for name, module in (("G", trainer.G.denoiser), ("fake", trainer.mu_fake), ("ema", trainer.ema)):
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(folder / f"{name}.safetensors"))
"""


@pytest.mark.slow
def test_lora_resume_in_fresh_process_is_exact(tmp_path):
    from safetensors.torch import load_file

    torch.use_deterministic_algorithms(True)
    try:
        straight = make_trainer(**LORA)
        for _ in range(4):
            straight.train_step()
        first = make_trainer(**LORA)
        for _ in range(2):
            first.train_step()
        files = first.state_files()
    finally:
        torch.use_deterministic_algorithms(False)
    (tmp_path / "ckpt").mkdir()
    for name, data in files.items():
        (tmp_path / "ckpt" / name).write_bytes(data)
    assert all(".lora_" in k.replace(":", ".") for k in first.G.denoiser.state_dict())  # adapters, not the base
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", RESUME_SCRIPT, str(tmp_path), "2", str(torch.get_num_threads()),
                    json.dumps(LORA)], cwd=REPO, env=env, check=True)
    for name, module in (("G", straight.G.denoiser), ("fake", straight.mu_fake), ("ema", straight.ema)):
        resumed = load_file(str(tmp_path / f"{name}.safetensors"))
        for key, value in module.state_dict().items():
            assert torch.equal(resumed[key], value), f"{name}.{key} differs after resume"
