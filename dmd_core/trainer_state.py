"""A trainer's checkpoint: weights, optimizers, EMA, GAN head, generators and stream positions as safetensors + JSON
files (no pickle); resuming from them continues bit-exactly (torchtitan's Stateful objects, one call)."""
from __future__ import annotations

import json

import torch

from . import accel
from .checkpoint import bytes_to_tensors, files_to_state, state_to_files, tensors_to_bytes


def checkpoint_files(trainer) -> dict[str, bytes]:
    """Everything needed to resume exactly, as file name -> bytes (safetensors + JSON, no pickle)."""
    G, fake = accel.unwrap_ddp(trainer.G.denoiser), accel.unwrap_ddp(trainer.mu_fake)
    full = accel.full_state  # sharded (FSDP2) weights and moments are saved whole: the files of one process
    files = {"generator.safetensors": tensors_to_bytes(full(G.state_dict())),
             "fake.safetensors": tensors_to_bytes(full(fake.state_dict())),
             "ema.safetensors": tensors_to_bytes(full(trainer.ema.state_dict()))}
    if trainer.gan_head is not None:
        files["gan_head.safetensors"] = tensors_to_bytes(trainer.gan_head.state_dict())
    files.update(state_to_files(full(trainer.opt_G.state_dict()), "optim_generator"))
    if trainer.opt_fake is not None:
        files.update(state_to_files(full(trainer.opt_fake.state_dict()), "optim_fake"))
    rng = {"trainer": trainer.rng.get_state(), "torch_cpu": torch.get_rng_state()}
    if trainer.device.type == "cuda":
        rng["torch_cuda"] = torch.cuda.get_rng_state(trainer.device)
    cfg = trainer.base_cfg
    k = cfg.phase_index(trainer.step)  # distill.phases: the phase iteration `step` runs in (0 without phases)
    state = {"step": trainer.step, "nonfinite_skipped": trainer.nonfinite_skipped,
             "consecutive_nonfinite": trainer.consecutive_nonfinite,
             "ttur_phase": (trainer.step - cfg.phase_starts()[k]) % cfg.phase_config(k).fake_updates_per_generator,
             "phase": k,
             "pairs": trainer.pairs.state_dict() if trainer.pairs else None,
             "real": trainer.real.state_dict() if trainer.real else None}
    trainer.collective.save_rng(rng, state)  # every process's torch generators (a collective under DDP)
    files["rng.safetensors"] = tensors_to_bytes(rng)
    files["trainer_state.json"] = json.dumps(state, sort_keys=True, indent=2).encode()
    return files

def load_checkpoint_files(trainer, files: dict[str, bytes]) -> None:
    """Restore from `state_files()` output; continues bit-exactly on the same device."""
    accel.load_module_state(accel.unwrap_ddp(trainer.G.denoiser), bytes_to_tensors(files["generator.safetensors"]))
    accel.load_module_state(accel.unwrap_ddp(trainer.mu_fake), bytes_to_tensors(files["fake.safetensors"]))
    accel.load_module_state(trainer.ema, bytes_to_tensors(files["ema.safetensors"]))
    if trainer.gan_head is not None:
        trainer.gan_head.load_state_dict(bytes_to_tensors(files["gan_head.safetensors"]))
    accel.load_optimizer_state(trainer.opt_G, files_to_state(files, "optim_generator"))
    accel.match_state_layout(trainer.opt_G)
    if trainer.opt_fake is not None:
        accel.load_optimizer_state(trainer.opt_fake, files_to_state(files, "optim_fake"))
        accel.match_state_layout(trainer.opt_fake)
    rng = bytes_to_tensors(files["rng.safetensors"])
    trainer.rng.set_state(rng["trainer"])
    torch.set_rng_state(rng["torch_cpu"])
    if trainer.device.type == "cuda" and "torch_cuda" in rng:
        torch.cuda.set_rng_state(rng["torch_cuda"], trainer.device)
    state = json.loads(files["trainer_state.json"])
    trainer.step, trainer.nonfinite_skipped = int(state["step"]), int(state["nonfinite_skipped"])
    trainer.consecutive_nonfinite = int(state["consecutive_nonfinite"])
    if trainer.pairs is not None and state["pairs"]:
        trainer.pairs.load_state_dict(state["pairs"])
    if trainer.real is not None and state["real"]:
        trainer.real.load_state_dict(state["real"])
    trainer.collective.load_rng(rng, state, trainer.cfg.seed, trainer.step)
