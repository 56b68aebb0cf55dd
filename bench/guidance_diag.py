"""Diagnose a guided digits student at several w: its samples against the teacher's N-step samples (pixel
statistics), the guidance embeddings' output norms, how much the fake score depends on w, and the DM gradient
on the student's own samples (does descending it move them toward the teacher's statistics?).

    python bench/guidance_diag.py --root /tmp/g12/bench --run guided-uniform-1-3-s400 [--step 400] [--fixed fixed-w3-s400]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from dmd_core.checkpoint import bytes_to_tensors  # noqa: E402
from dmd_core.denoisers import CFGDenoiser  # noqa: E402
from dmd_core.generator import Generator  # noqa: E402
from dmd_core.guidance import guided_denoiser, student_at, student_cond, student_denoiser  # noqa: E402
from dmd_core.losses import dm_gradient  # noqa: E402
from storage.checkpoints import checkpoint_folder, checkpoint_weights, list_checkpoints  # noqa: E402
from storage.layout import checkpoint_prefix  # noqa: E402
from tasks.context import open_run, run_teacher  # noqa: E402
from tasks.stages import resume_key  # noqa: E402


def stats(x: torch.Tensor) -> str:
    x = x.float()
    return (f"mean {x.mean():+.3f} std {x.std():.3f} |x|>0.9 {(x.abs() > 0.9).float().mean():.3f} "
            f"x>0.5 {(x > 0.5).float().mean():.3f} min {x.min():+.2f} max {x.max():+.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/g12/bench")
    ap.add_argument("--run", default="guided-uniform-1-3-s400")
    ap.add_argument("--step", type=int, default=None)
    ap.add_argument("--scales", default="1,1.5,2,2.5,3")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--teacher-steps", type=int, default=25)
    ap.add_argument("--fixed", default=None, help="a fixed-w run to compare (its distill.guidance is its w)")
    args = ap.parse_args()
    torch.manual_seed(0)
    scales = [float(s) for s in args.scales.split(",")]
    store, cfg = open_run(args.root, args.run)
    d = cfg.distill
    teacher = run_teacher(store, cfg, torch.device("cpu"))
    key = resume_key(store, cfg)
    step = args.step or list_checkpoints(store, key)[-1]
    g = torch.Generator().manual_seed(123)
    z = torch.randn((args.n, *teacher.sample_shape), generator=g)
    y = torch.randint(0, 10, (args.n,), generator=g)
    cond = teacher.encode(y)
    D = student_denoiser(teacher, checkpoint_weights(store, step, key, True), d)
    G = Generator(D, teacher.process, d.generator_timesteps)
    prefix = checkpoint_prefix(step, checkpoint_folder(store, key))
    fake_w = bytes_to_tensors(store.read_bytes(f"{prefix}/fake.safetensors"))
    fake = guided_denoiser(teacher.denoiser, d.guidance_embedding_dim) if d.guidance_range else None
    if fake is None:
        fake = teacher.student(fake_w)
    else:
        fake.load_state_dict(fake_w)
    fake = fake.eval().requires_grad_(False)
    print(f"run {args.run} step {step}")
    if d.guidance_range:
        ws = torch.tensor(scales)
        for name, mod in (("G", D.net), ("fake", fake.net)):
            e = mod.guidance(ws)
            base = mod.guidance(torch.ones(1))
            print(f"{name} embedding |e(w)|:", " ".join(f"w={w:g}:{n:.3f}" for w, n in zip(scales, e.norm(dim=1))),
                  "| |e(w)-e(1)|:", " ".join(f"{n:.3f}" for n in (e - base).norm(dim=1)))
        # reference: the time embedding input norm (sinusoidal timestep features)
        tproj = D.net.unet.time_proj(torch.tensor([999, 500, 50]))
        print("time_proj norms (t=999,500,50):", tproj.norm(dim=1).tolist())
    sched = teacher.process
    for w in scales:
        with torch.no_grad():
            x_ref = teacher.sample(cfg.pairs.solver, args.teacher_steps, z, cond, w).float()
            Gw = student_at(G, d, w)
            x = Gw(z, cond, generator=torch.Generator().manual_seed(1)).float()
            print(f"\nw={w:g}\n  teacher {stats(x_ref)}\n  student {stats(x)}   mse-to-teacher(same z) "
                  f"{((x - x_ref) ** 2).mean():.4f}")
            real = CFGDenoiser(teacher.denoiser, w, teacher.null_cond)
            wv = torch.full((args.n,), w)
            if d.guidance_range:
                def fk(xt, t, c, wq=w):
                    return fake(xt, t, student_cond(fake, c, torch.full((xt.shape[0],), wq)))
            else:
                def fk(xt, t, c, wq=w):
                    return fake(xt, t, c)
            for tt in (100, 300, 500, 700, 900):
                t = torch.full((args.n,), float(sched.level(tt)), dtype=torch.float64)  # the level of timestep tt
                eps = torch.randn(x.shape, generator=g)
                xt = sched.add_noise(x, eps, t)
                pr, pf = real(xt, t, cond), fk(xt, t, cond)
                p1 = fk(xt, t, cond, 1.0)
                pt = teacher.denoiser(xt, t, cond)
                a, s = sched.alpha(t, x), sched.sigma(t, x)
                grad = dm_gradient(x, xt, pr, pf, a, s, d.dm_weighting)
                # denoising error of the fake on G's own samples (how well it models them) vs the real's
                ef, er = ((pf - x) ** 2).mean(), ((pr - x) ** 2).mean()
                e1 = ((p1 - x) ** 2).mean()
                # does a small step against the gradient move x toward the teacher's pixel std / saturation?
                x2 = x - 0.05 * grad
                dstd = x2.std() - x.std()
                dsat = ((x2.abs() > 0.9).float().mean() - (x.abs() > 0.9).float().mean())
                cos = torch.nn.functional.cosine_similarity((-grad).flatten(1), (x_ref - x).flatten(1)).mean()
                print(f"  t={tt:3d} |grad| {grad.abs().mean():.3f} fake-vs-real |d| {(pf - pr).abs().mean():.4f} "
                      f"fake(w)-fake(1) |d| {(pf - p1).abs().mean():.4f} real-vs-cond |d| {(pr - pt).abs().mean():.4f} "
                      f"denoise-err fake(w) {ef:.4f} fake(1) {e1:.4f} real {er:.4f} | step: dstd {dstd:+.4f} "
                      f"dsat {dsat:+.4f} cos(-grad, x_ref-x) {cos:+.3f}")


if __name__ == "__main__":
    main()
