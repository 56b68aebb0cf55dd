"""bench/guidance_sweep.py's comparison on one GPU, without Prefect or the artifact store (dmd_core only).

The same digits recipe, pairs (z_i, class i mod 10 as the pairs stage draws them), trainer and evaluation noise
as the pipeline; the runs differ only in `distill.guidance` / `distill.guidance_range`. Two parts:

    python bench/guidance_sweep_gpu.py train --out OUT --device cuda     # samples.safetensors into OUT
    python bench/guidance_sweep_gpu.py score --out OUT --docs docs       # FD / accuracy, table and plot (CPU)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))
from dmd_core.conditions import hash_seed  # noqa: E402
from tasks.config import load_config  # noqa: E402
from dmd_core.generator import Generator  # noqa: E402
from dmd_core.guidance import student_at  # noqa: E402
from dmd_core.streams import TensorStream  # noqa: E402
from dmd_core.teachers import load_teacher  # noqa: E402
from dmd_core.trainer import DMDTrainer  # noqa: E402


def runs(scales: list[float], w_range: tuple[float, float], law: str) -> dict[str, dict]:
    out = {f"guided-{law}-{w_range[0]:g}-{w_range[1]:g}": {"guidance_range": w_range, "guidance_law": law}}
    out.update({f"fixed-w{w:g}": {"guidance": w} for w in scales})
    return out


@torch.no_grad()
def pairs(teacher, cfg, device) -> dict[str, torch.Tensor]:
    """The pairs stage's pairs: z_i from hash_seed(seed, i), class i mod K, the teacher's ODE solution."""
    p = cfg.pairs
    z = torch.stack([torch.randn(teacher.sample_shape, generator=torch.Generator().manual_seed(hash_seed(p.seed, i)))
                     for i in range(p.n)])
    cond = torch.arange(p.n) % teacher.num_classes
    y = torch.cat([teacher.sample(p.solver, p.steps, zb.to(device), cb.to(device), p.guidance).float().cpu()
                   for zb, cb in zip(z.split(p.batch_size), cond.split(p.batch_size))])
    return {"z": z, "y": y, "cond": cond}


def train(args) -> None:
    from safetensors.torch import save_file

    from dmd_core.datasets import real_dataset

    device = torch.device(args.device)
    cfg = load_config("digits", overrides=[f"distill.steps={args.steps}"])
    teacher = load_teacher("unet2d", PROJECT / "teachers" / "digits", prediction_type="v_prediction").to(device)
    data = pairs(teacher, cfg, device)
    e = cfg.evaluate
    images, labels = real_dataset("digits")
    g = torch.Generator().manual_seed(e.seed)  # the evaluate stage's noise and labels
    z = torch.randn((e.n_samples, *teacher.sample_shape), generator=g)
    y = labels[torch.randperm(images.shape[0], generator=g)[: e.n_samples]]
    out, times = {"z": z, "y": y}, {}
    with torch.no_grad():
        for w in args.scales:
            out[f"teacher@{w:g}"] = torch.cat([teacher.sample(cfg.pairs.solver, e.teacher_steps, zb.to(device),
                                                              yb.to(device), w).float().cpu()
                                               for zb, yb in zip(z.split(e.batch_size), y.split(e.batch_size))])
    for name, overrides in runs(args.scales, tuple(args.range), args.law).items():
        d = cfg.distill.model_copy(update=overrides)
        t0 = time.time()
        trainer = DMDTrainer(d, teacher, conditions=teacher.conditions(), device=device,
                             pairs=TensorStream(data, d.reg_batch_size or d.batch_size, d.seed),
                             pairs_guidance=cfg.pairs.guidance)
        for _ in range(d.steps):
            trainer.train_step()
        times[name] = time.time() - t0
        G = Generator(trainer.ema, teacher.process, d.generator_timesteps)
        for w in args.scales:
            renoise = torch.Generator(device).manual_seed(1)
            with torch.no_grad():
                out[f"{name}@{w:g}"] = torch.cat([student_at(G, d, w)(zb.to(device), yb.to(device), generator=renoise)
                                                  .float().cpu() for zb, yb in zip(z.split(e.batch_size),
                                                                                    y.split(e.batch_size))])
        print(name, f"{times[name]:.1f} s", flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(Path(args.out) / "samples.safetensors"))
    (Path(args.out) / "meta.json").write_text(json.dumps({"scales": args.scales, "range": args.range, "law": args.law,
                                                          "steps": args.steps, "seconds": times,
                                                          "device": torch.cuda.get_device_name() if device.type == "cuda"
                                                          else "cpu"}))


def score(args) -> None:
    from safetensors.torch import load_file

    from dmd_core.datasets import real_dataset
    from dmd_core.fid import frechet_distance
    from dmd_core.metrics import features_and_predictions, gaussian_stats, train_classifier
    from storage.plots import guidance_png

    meta = json.loads((Path(args.out) / "meta.json").read_text())
    s = load_file(str(Path(args.out) / "samples.safetensors"))
    e = load_config("digits").evaluate
    images, labels = real_dataset("digits")
    model = train_classifier(images, labels, e.classifier_epochs, e.seed)  # the evaluate stage's classifier
    real = gaussian_stats(features_and_predictions(model, images)[0])

    def metrics(x, ref):
        feats, preds = features_and_predictions(model, x)
        out = {"fd": frechet_distance(*gaussian_stats(feats), *real), "accuracy": float((preds == s["y"]).float().mean())}
        if ref is not None:
            out["fd_teacher"] = frechet_distance(*gaussian_stats(feats), *gaussian_stats(features_and_predictions(model, ref)[0]))
        return out

    names = list(runs(meta["scales"], tuple(meta["range"]), meta["law"]))
    guided, plot, ok_all = names[0], [], True
    lines = ["| w | teacher 50-step FD to real | teacher accuracy | fixed-w student FD to teacher@w | fixed-w accuracy "
             "| guided student FD to teacher@w | guided accuracy | ratio guided / fixed | pass |",
             "|---|---|---|---|---|---|---|---|---|"]
    for w in meta["scales"]:
        ref = s[f"teacher@{w:g}"]
        t, f, g = metrics(ref, None), metrics(s[f"fixed-w{w:g}@{w:g}"], ref), metrics(s[f"{guided}@{w:g}"], ref)
        ok = g["fd_teacher"] <= 1.5 * f["fd_teacher"] and g["accuracy"] >= 0.95
        ok_all &= ok
        lines.append(f"| {w:g} | {t['fd']:.2f} | {t['accuracy']:.1%} | {f['fd_teacher']:.2f} | {f['accuracy']:.1%} "
                     f"| {g['fd_teacher']:.2f} | {g['accuracy']:.1%} | {g['fd_teacher'] / f['fd_teacher']:.2f} "
                     f"| {'yes' if ok else 'no'} |")
        for label, m in ((f"guided student, w in {meta['range']}", g), ("fixed-w students (one per w)", f),
                         ("teacher 50-step", t)):
            plot += [{"label": label, "guidance": w, "metric": k, "value": v} for k, v in m.items()]
    table = "\n".join(lines)
    stem = f"guidance-sweep-gpu-{meta['law']}-s{meta['steps']}"
    Path(args.docs, f"{stem}.png").write_bytes(guidance_png(plot, f"digits ({meta['device']}): one guided student "
                                                                  f"vs fixed-w students, {meta['steps']} steps each"))
    text = f"{table}\n\nall pass: {ok_all}\n\ntraining seconds: {json.dumps(meta['seconds'])}\n"
    Path(args.docs, f"{stem}.md").write_text(text)
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=["train", "score"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--docs", default=str(PROJECT / "docs"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0])
    ap.add_argument("--range", type=float, nargs=2, default=[1.0, 3.0])
    ap.add_argument("--law", default="uniform", choices=["uniform", "log-uniform"])
    args = ap.parse_args()
    train(args) if args.part == "train" else score(args)


if __name__ == "__main__":
    main()
