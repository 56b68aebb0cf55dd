"""One DMD recipe experiment on the embedded digits preset: teacher (cached), pairs (cached), distill, evaluate.

`run(teacher_cfg, distill_cfg, n_pairs, device, seed)` prints one JSON line per evaluation and returns the last.
FD = Fréchet distance in the 64-d features of `train_classifier` (all 1797 real digits, 30 epochs), between
1797 generated samples (labels = the real labels) and the 1797 real digits.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from dmd_core.config import DataConfig, DistillConfig, TeacherConfig
from dmd_core.denoisers import NetDenoiser
from dmd_core.generator import Generator
from dmd_core.fid import frechet_distance
from dmd_core.metrics import features_and_predictions, gaussian_stats, train_classifier
from dmd_core.samplers import ddim_sample
from dmd_core.processes import VPDiscrete, timestep_grid
from dmd_core.streams import TensorStream
from dmd_core.trainer import DMDTrainer

CACHE = Path(os.environ.get("RECIPE_CACHE", Path(__file__).resolve().parent / "cache"))
DATA = DataConfig()


def log(**kw) -> dict:
    print(json.dumps(kw, sort_keys=True), flush=True)
    return kw


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def load_digits_cached() -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn digits in [-1, 1]; from a small npz when sklearn is absent (the GPU image)."""
    path = CACHE / "digits.npz"
    if path.is_file():
        d = np.load(path, allow_pickle=False)
        return torch.from_numpy(d["images"].astype(np.float32) / 8.0 - 1.0).unsqueeze(1), torch.from_numpy(d["labels"].astype(np.int64))
    from sklearn.datasets import load_digits

    bunch = load_digits()
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, images=bunch.images.astype(np.uint8), labels=bunch.target.astype(np.uint8))
    return load_digits_cached()


def teacher_cached(tcfg: TeacherConfig, device: str):
    """(NetDenoiser on CPU, VPDiscrete); trains once per config and caches the EMA weights as safetensors."""
    from safetensors.torch import load_file, save_file

    from dmd_core.digits import build_scheduler, build_unet, train_teacher

    path = CACHE / f"teacher-{_key(tcfg.model_dump(mode='json'))}.safetensors"
    if path.is_file():
        unet = build_unet(DATA, tcfg)
        unet.load_state_dict(load_file(path))
        scheduler = build_scheduler(tcfg)
    else:
        images, labels = load_digits_cached()
        t0 = time.time()
        unet, scheduler = train_teacher(DATA, tcfg, images, labels, device=device)
        log(event="teacher_trained", seconds=round(time.time() - t0, 1), path=path.name)
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(tmp))
        tmp.rename(path)
    unet = unet.eval().requires_grad_(False)
    schedule = VPDiscrete.from_scheduler(scheduler)
    return NetDenoiser(unet, schedule, tcfg.prediction_type), schedule


@torch.no_grad()
def teacher_pairs(teacher, schedule, n: int, seed: int, device: str, steps: int = 50, batch: int = 512) -> dict:
    """n noise-image pairs from teacher DDIM (eta 0), class labels uniform (DMD §3.3)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((n, DATA.channels, DATA.image_size, DATA.image_size), generator=g)
    cond = torch.randint(0, DATA.num_classes, (n,), generator=g)
    teacher = teacher.to(device)
    ys = [ddim_sample(teacher, zb.to(device), timestep_grid(schedule.T, steps), schedule, cb.to(device)).cpu()
          for zb, cb in zip(z.split(batch), cond.split(batch))]
    return {"z": z, "y": torch.cat(ys), "cond": cond}


class Evaluator:
    """Classifier features of the real digits; FD and accuracy of any sampler `fn(z, labels) -> x`."""

    def __init__(self, seed: int = 1234, classifier_epochs: int = 30) -> None:
        self.images, self.labels = load_digits_cached()
        self.classifier = self._classifier(classifier_epochs)
        feats, _ = features_and_predictions(self.classifier, self.images)
        self.real_stats = gaussian_stats(feats)
        self.real_feats = feats
        self.seed = seed

    def _classifier(self, epochs: int):
        from safetensors.torch import load_file, save_file

        from dmd_core.metrics import DigitsClassifier

        path = CACHE / f"classifier-e{epochs}.safetensors"
        if path.is_file():
            model = DigitsClassifier(10)
            model.load_state_dict(load_file(path))
            return model.eval().requires_grad_(False)
        model = train_classifier(self.images, self.labels, epochs=epochs, seed=0)
        CACHE.mkdir(parents=True, exist_ok=True)
        save_file(model.state_dict(), str(path))
        return model

    def floor(self) -> float:
        """Real-vs-real FD between two disjoint halves (898 vs 899)."""
        perm = torch.randperm(len(self.labels), generator=torch.Generator().manual_seed(self.seed)).numpy()
        a, b = perm[: len(perm) // 2], perm[len(perm) // 2:]
        return frechet_distance(*gaussian_stats(self.real_feats[a]), *gaussian_stats(self.real_feats[b]))

    @torch.no_grad()
    def __call__(self, fn, device: str, batch: int = 1024) -> dict:
        g = torch.Generator().manual_seed(self.seed)
        z = torch.randn((len(self.labels), DATA.channels, DATA.image_size, DATA.image_size), generator=g)
        xs = [fn(zb.to(device), yb.to(device)).float().cpu() for zb, yb in zip(z.split(batch), self.labels.split(batch))]
        x = torch.cat(xs)
        feats, preds = features_and_predictions(self.classifier, x)
        fd = frechet_distance(*gaussian_stats(feats), *self.real_stats)
        return {"fd": round(fd, 3), "acc": round(float((preds == self.labels).float().mean()), 4)}


def pairs_cached(tcfg: TeacherConfig, teacher, schedule, n: int, seed: int, device: str, steps: int = 50) -> dict:
    from safetensors.torch import load_file, save_file

    key = [tcfg.model_dump(mode='json'), n, seed] + ([steps] if steps != 50 else [])
    path = CACHE / f"pairs-{_key(key)}.safetensors"
    if path.is_file():
        return load_file(path)
    pairs = teacher_pairs(teacher, schedule, n, seed, device, steps)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    save_file(pairs, str(tmp))
    tmp.rename(path)
    return pairs


def teacher_metrics(tcfg: TeacherConfig, t_stars: list[int], device: str, ev: Optional[Evaluator] = None) -> dict:
    """Floor, teacher DDIM-50 and teacher 1-step FD at each t*."""
    ev = ev or Evaluator()
    teacher, schedule = teacher_cached(tcfg, device)
    teacher = teacher.to(device)
    grid = timestep_grid(schedule.T, 50)
    out = {"floor": round(ev.floor(), 3),
           "teacher_50": ev(lambda z, y: ddim_sample(teacher, z, grid, schedule, y), device)}
    for t in t_stars:
        gen = Generator(teacher, schedule, [t])
        out[f"teacher_1step_{t}"] = ev(lambda z, y: gen(z, y), device)
    return out


def run(teacher_cfg: TeacherConfig, distill_cfg: DistillConfig, n_pairs: int, device: str = "cpu", seed: int = 0,
        eval_every: int = 100, tag: str = "", ev: Optional[Evaluator] = None, with_teacher: bool = True,
        pair_steps: int = 50) -> dict:
    """Teacher (cached) -> pairs -> DMD distillation, evaluating the EMA generator every `eval_every` steps."""
    torch.manual_seed(seed)
    ev = ev or Evaluator()
    teacher, schedule = teacher_cached(teacher_cfg, device)
    t_star = distill_cfg.generator_timesteps[0]
    if with_teacher:
        log(tag=tag, event="teacher", **teacher_metrics(teacher_cfg, [t_star], device, ev))
    t0 = time.time()
    pairs = pairs_cached(teacher_cfg, teacher, schedule, n_pairs, seed, device, pair_steps)
    t_pairs = time.time() - t0
    cfg = distill_cfg.model_copy(update={"seed": seed})
    stream = TensorStream(pairs, cfg.reg_batch_size or cfg.batch_size, seed)
    trainer = DMDTrainer(cfg, teacher, schedule, (DATA.channels, DATA.image_size, DATA.image_size),
                         num_classes=DATA.num_classes, null_cond=DATA.num_classes, pairs=stream, device=device)
    last, t_train, t_eval = {}, 0.0, 0.0
    for step in range(cfg.steps + 1):
        if step % eval_every == 0 or step == cfg.steps:
            te = time.time()
            gen = trainer.ema_generator().eval()
            m = ev(lambda z, y: gen(z, y), device)
            t_eval += time.time() - te
            last = log(tag=tag, event="eval", step=step, seconds_train=round(t_train, 1),
                       s_per_step=round(t_train / max(step, 1), 4), seconds_pairs=round(t_pairs, 1),
                       seconds_eval=round(t_eval, 1), **m, **{k: round(v, 4) for k, v in metrics.items()
                                                               if k.startswith("loss")} if step else {})
        if step == cfg.steps:
            break
        ts = time.time()
        metrics = trainer.train_step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t_train += time.time() - ts
    return last


def main(argv: list[str]) -> None:
    """python bench/recipe/experiment.py '{"teacher": {...}, "distill": {...}, "n_pairs": 2048, ...}'"""
    spec = json.loads(argv[0]) if argv else {}
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = spec.get("device", "cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    if spec.get("mode") == "teacher":
        tcfg = TeacherConfig(**spec.get("teacher", {}))
        log(tag=spec.get("tag", ""), event="teacher", **teacher_metrics(tcfg, spec.get("t_stars", [999]), device))
        teacher, schedule = teacher_cached(tcfg, device)
        for n in spec.get("pairs", []):
            for s in spec.get("pair_seeds", [0]):
                pairs_cached(tcfg, teacher, schedule, n, s, device)
        return
    run(TeacherConfig(**spec.get("teacher", {})), DistillConfig(**spec.get("distill", {})), spec.get("n_pairs", 2048),
        device, spec.get("seed", 0), spec.get("eval_every", 100), spec.get("tag", ""),
        with_teacher=spec.get("with_teacher", True), pair_steps=spec.get("pair_steps", 50))


if __name__ == "__main__":
    main(sys.argv[1:])
