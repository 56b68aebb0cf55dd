"""evaluate.precision: the evaluated models generate under autocast (bf16 on CUDA by default), fp32 on the CPU exactly
as before; the section hashes as before at its default."""
from types import SimpleNamespace

import pytest
import torch

from dmd_core import accel
from dmd_core.config import ConfigError, EvaluateConfig, stable_hash
from tasks.config import load_config
from dmd_core.generator import Generator
from dmd_core.teachers import Teacher
from storage import ArtifactStore
from tasks import eval_protocols
from tasks.eval_protocols import Models, generating, result_hashes
from tests.helpers import tiny_teacher

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def teacher() -> Teacher:
    D = tiny_teacher()
    return Teacher("unet2d", D, D.process, (1, 8, 8), "epsilon", num_classes=10).frozen()


@pytest.fixture(scope="module")
def inputs():
    return torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 10


def samples(teacher, inputs, precision: str, images: bool = False, monkeypatch=None) -> dict[str, torch.Tensor]:
    """Each Models callable's output at evaluate.precision=`precision` (the student: the teacher at G's steps)."""
    cfg = load_config("digits-tiny", overrides=[f"evaluate.precision={precision}"])
    if monkeypatch is not None:
        monkeypatch.setattr(eval_protocols, "student", lambda store, cfg, T, step: Generator(
            T.denoiser, T.process, cfg.distill.generator_timesteps))
    models = Models(None, cfg, teacher, CPU, images=images)
    out = {"teacher_steps": models.teacher_steps()(*inputs), "teacher_generator": models.teacher_generator()(*inputs)}
    if monkeypatch is not None:
        out["student"] = models.student(0)(*inputs)
    return out


def test_precision_resolves_auto_by_device_and_refuses_unknown_values():
    cpu, cuda = CPU, torch.device("cuda")
    assert accel.resolve_precision("auto", cpu) == "fp32" and accel.resolve_precision("auto", cuda) == "bf16"
    assert accel.resolve_precision("bf16", cpu) == "bf16" and accel.resolve_precision("fp16", cuda) == "fp16"
    with pytest.raises(ValueError, match="precision"):
        accel.resolve_precision("fp8", cpu)
    with pytest.raises(ConfigError, match=r"evaluate\.precision.*'auto', 'fp32', 'bf16' or 'fp16'.*'fp8'"):
        load_config("digits-tiny", overrides=["evaluate.precision=fp8"])

    from tasks.pairs import solver_precision  # the pairs stage resolves pairs.precision the same way
    assert solver_precision(load_config("digits-tiny"), cpu) == "fp32"
    assert solver_precision(load_config("digits-tiny"), cuda) == "bf16"
    assert solver_precision(load_config("digits-tiny", overrides=["pairs.precision=fp16"]), cpu) == "fp16"


def test_default_precision_keeps_the_evaluate_hash_and_other_values_change_it():
    """At auto the field is left out of the dump: runs made before it existed keep their cached results."""
    assert "precision" not in EvaluateConfig().model_dump()
    assert stable_hash(EvaluateConfig().model_dump(mode="json")) == "29b79f76a77d6ec8"  # the hash before the field
    store = ArtifactStore("memory://dmd-eval-precision")  # no pairs: the student hash takes their empty fingerprint
    base = result_hashes(store, load_config("digits-tiny"))
    assert result_hashes(store, load_config("digits-tiny", overrides=["evaluate.precision=auto"])) == base
    for value in ("fp32", "bf16"):
        cfg = load_config("digits-tiny", overrides=[f"evaluate.precision={value}"])
        assert cfg.model_dump()["evaluate"]["precision"] == value
        changed = result_hashes(store, cfg)
        assert all(changed[k] != base[k] for k in ("teacher", "teacher-G0", "student"))


def test_auto_on_the_cpu_generates_exactly_as_fp32_and_as_before(teacher, inputs):
    auto, fp32 = samples(teacher, inputs, "auto"), samples(teacher, inputs, "fp32")
    for name in auto:
        assert auto[name].dtype == torch.float32 and torch.equal(auto[name], fp32[name]), name
    cfg, (z, y) = load_config("digits-tiny"), inputs
    before = teacher.sample(cfg.pairs.solver, cfg.evaluate.teacher_steps, z, teacher.encode(y), cfg.pairs.guidance)
    assert torch.equal(auto["teacher_steps"], before)
    images = samples(teacher, inputs, "auto", images=True)["teacher_steps"]
    assert torch.equal(images, (teacher.decode(before) / 2 + 0.5).clamp(0, 1))  # as image_protocol decoded before


def test_bf16_generates_under_autocast_and_returns_float32(teacher, inputs, monkeypatch):
    """bf16 keeps 8 significant bits (relative rounding 2^-9): after a few UNet passes the samples move by a few
    tenths of a percent of their scale. Nonzero shows autocast ran; under 2 % of the scale shows it is rounding,
    not a different computation."""
    fp32, bf16 = (samples(teacher, inputs, p, monkeypatch=monkeypatch) for p in ("fp32", "bf16"))
    assert set(bf16) == {"teacher_steps", "teacher_generator", "student"}
    for name, x in bf16.items():
        assert x.dtype == torch.float32, name
        diff, scale = (x - fp32[name]).abs().max(), fp32[name].abs().max()
        assert 0 < diff < 0.02 * scale, (name, float(diff), float(scale))
    images = samples(teacher, inputs, "bf16", images=True)["teacher_generator"]
    assert images.dtype == torch.float32 and 0 <= images.min() and images.max() <= 1


def test_decode_runs_under_autocast_and_the_images_leave_in_float32(teacher, inputs):
    """A decoder that autocast runs in bf16 (a convolution, as in the VAE) is part of generation; the images it
    makes reach the feature extractors in float32."""
    conv, decoded = torch.nn.Conv2d(1, 3, 3, padding=1), []
    stub = SimpleNamespace(encode=teacher.encode, decode=lambda x: decoded.append(conv(x)) or decoded[-1])
    sample = generating(stub, lambda z, cond: z, "bf16", CPU, images=True)
    images = sample(*inputs)
    assert decoded[0].dtype == torch.bfloat16 and images.dtype == torch.float32
    assert torch.equal(images, (decoded[0].float() / 2 + 0.5).clamp(0, 1))
