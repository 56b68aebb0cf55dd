"""One guidance-conditioned digits student against one fixed-w student per w, with the same total steps.

Runs `dmd run` (the digits preset) once with `distill.guidance_range` and once per fixed w with
`distill.guidance=w`, each with the evaluate stage's guidance sweep; then tabulates, at every w, the FD of each
student to the teacher's N-step samples at that same w and its class accuracy, and draws the sweep
(docs/guidance.md shows the result and the command):

    OMP_NUM_THREADS=2 python bench/guidance_sweep.py --root /tmp/guidance --out docs

or in parts, in parallel processes (the fixed-w runs copy the guided run's teacher and pairs when it has them):

    OMP_NUM_THREADS=1 python bench/guidance_sweep.py --root /tmp/guidance --only guided &
    OMP_NUM_THREADS=1 python bench/guidance_sweep.py --root /tmp/guidance --only fixed --scales 1,1.5,2 &
    OMP_NUM_THREADS=1 python bench/guidance_sweep.py --root /tmp/guidance --only fixed --scales 3
    python bench/guidance_sweep.py --root /tmp/guidance --out docs --only table

A variant of the guided student in its own run folder, compared with the 400-step fixed-w runs:

    OMP_NUM_THREADS=1 python bench/guidance_sweep.py --root /tmp/guidance --only guided --law log-uniform \
        --guided-name guided-drawn-log-s400 --extra distill.regression_guidance=drawn
    python bench/guidance_sweep.py --root /tmp/guidance --only table --law log-uniform --guided-name guided-drawn-log-s400

Acceptance (issue "one student for every guidance scale"): at every w, FD(guided) <= 1.5 x FD(fixed-w) and the
guided student's class accuracy >= 95%.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))
from storage.plots import guidance_png  # noqa: E402

RATIO, ACCURACY = 1.5, 0.95


def dmd_run(root: str, name: str, overrides: list[str], stages: str) -> float:
    """`dmd run --preset digits` with overrides; returns its wall time in seconds."""
    cmd = [sys.executable, "-c", "from flows.cli import main; main()", "run", "--preset", "digits", "--root", root,
           "--stages", stages, "--set", f"name={name}"]
    for item in overrides:
        cmd += ["--set", item]
    print("$ dmd " + " ".join(cmd[3:]), flush=True)
    t0 = time.time()
    env = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300", **os.environ, "PYTHONPATH": str(PROJECT)}
    subprocess.run(cmd, check=True, cwd=PROJECT, env=env, stdout=subprocess.DEVNULL)
    return time.time() - t0


def share_upstream(root: str, source: str, name: str) -> None:
    """Copy the teacher and pairs folders of run `source` into run `name`: the same data, teacher and pairs
    sections give the same bytes (their stage markers carry the config hash, so the stages are skipped)."""
    for stage in ("teacher", "pairs"):
        src, dst = Path(root) / source / stage, Path(root) / name / stage
        if (src / "_complete.json").is_file() and not dst.exists():
            shutil.copytree(src, dst)


def sweep_only(root: str, name: str) -> float:
    """The evaluate stage's guidance sweep alone (no baseline rows) on a run's last checkpoint; its wall time."""
    import torch

    from dmd_core.datasets import real_dataset
    from storage.checkpoints import list_checkpoints
    from tasks.context import open_run, run_teacher
    from tasks.eval_guidance import run_guidance_sweep
    from tasks.evaluate import protocol_of
    from tasks.stages import resume_key

    t0 = time.time()
    store, cfg = open_run(root, name)
    device = torch.device("cpu")
    step = list_checkpoints(store, resume_key(store, cfg))[-1]
    run_guidance_sweep(root, store, cfg, name, run_teacher(store, cfg, device), protocol_of(cfg),
                       real_dataset(cfg.data.name), step, device)
    return time.time() - t0


def sweep_rows(root: str, name: str) -> list[dict]:
    return pq.read_table(Path(root) / name / "eval" / "guidance.parquet").to_pylist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="/tmp/guidance")
    ap.add_argument("--out", default=str(PROJECT / "docs"), help="folder for guidance-sweep.png and .md")
    ap.add_argument("--scales", default="1,1.5,2,3", help="the fixed-w students and the sweep")
    ap.add_argument("--range", default="1,3", help="w_min,w_max of the guided student")
    ap.add_argument("--law", default="uniform", choices=["uniform", "log-uniform"])
    ap.add_argument("--steps", type=int, default=400, help="distill.steps of every student")
    ap.add_argument("--stages", default="teacher,pairs,distill,export",
                    help="of every run; without evaluate, the guidance sweep runs alone (no baseline rows)")
    ap.add_argument("--only", choices=["guided", "fixed", "table"], default=None,
                    help="one part (e.g. the guided and the fixed-w runs in two processes, then the table)")
    ap.add_argument("--extra", action="append", default=[], help="more --set overrides for every run")
    ap.add_argument("--guided-name", default=None, help="the guided run's name (default guided-<law>-<range>-s<steps>): "
                    "variants with --extra get their own run folder")
    ap.add_argument("--fixed-steps", type=int, default=None, help="steps of the fixed-w runs the table compares with "
                    "(default --steps), e.g. 400 against a guided student trained for 4 x 400")
    args = ap.parse_args()
    scales = [float(w) for w in args.scales.split(",")]
    w_min, w_max = (float(w) for w in args.range.split(","))
    sweep = f"evaluate.guidance_sweep=[{','.join(f'{w:g}' for w in scales)}]"
    common = [f"distill.steps={args.steps}", *args.extra]
    guided = args.guided_name or f"guided-{args.law}-{w_min:g}-{w_max:g}-s{args.steps}"
    fixed = {w: f"fixed-w{w:g}-s{args.fixed_steps or args.steps}" for w in scales}
    times = {}
    if args.only in (None, "guided"):
        if args.guided_name:  # a variant: the teacher and pairs of the first fixed-w run, when it has them
            share_upstream(args.root, fixed[scales[0]], guided)
        times[guided] = dmd_run(args.root, guided, [*common, f"distill.guidance_range=[{w_min:g},{w_max:g}]",
                                                    f"distill.guidance_law={args.law}", sweep], args.stages)
        if "evaluate" not in args.stages:
            times[guided] += sweep_only(args.root, guided)
    if args.only in (None, "fixed"):
        for w, name in fixed.items():
            share_upstream(args.root, guided if (Path(args.root) / guided).is_dir() else fixed[scales[0]], name)
            times[name] = dmd_run(args.root, name, [*common, f"distill.guidance={w:g}",
                                                    f"evaluate.guidance_sweep=[{w:g}]"], args.stages)
        for name in fixed.values():  # after all the distills: the teacher's samples at each w are cached by then
            if "evaluate" not in args.stages:
                times[name] += sweep_only(args.root, name)
    if args.only not in (None, "table"):
        print("\n".join(f"{name}: {t:.0f} s" for name, t in times.items()))
        return

    def value(rows, model, w, metric):
        return next(r["value"] for r in rows if r["model"] == model and r["guidance"] == w and r["metric"] == metric)

    g_rows = sweep_rows(args.root, guided)
    lines = ["| w | teacher 50-step FD to real | teacher accuracy | fixed-w student FD to teacher@w | fixed-w accuracy "
             "| guided student FD to teacher@w | guided accuracy | ratio guided / fixed | pass |",
             "|---|---|---|---|---|---|---|---|---|"]
    plot, ok_all = [], True
    for w in scales:
        f_rows = sweep_rows(args.root, fixed[w])
        fd_f, acc_f = value(f_rows, "student", w, "fd_teacher"), value(f_rows, "student", w, "accuracy")
        fd_g, acc_g = value(g_rows, "student", w, "fd_teacher"), value(g_rows, "student", w, "accuracy")
        ok = fd_g <= RATIO * fd_f and acc_g >= ACCURACY
        ok_all &= ok
        lines.append(f"| {w:g} | {value(g_rows, 'teacher', w, 'fd'):.2f} | {value(g_rows, 'teacher', w, 'accuracy'):.1%} "
                     f"| {fd_f:.2f} | {acc_f:.1%} | {fd_g:.2f} | {acc_g:.1%} | {fd_g / fd_f:.2f} | {'yes' if ok else 'no'} |")
        for metric in ("fd_teacher", "fd", "accuracy"):
            plot.append({"label": f"guided student, w in [{w_min:g}, {w_max:g}]", "guidance": w, "metric": metric,
                         "value": value(g_rows, "student", w, metric)})
            plot.append({"label": "fixed-w students (one per w)", "guidance": w, "metric": metric,
                         "value": value(f_rows, "student", w, metric)})
        for metric in ("fd", "accuracy"):
            plot.append({"label": "teacher 50-step", "guidance": w, "metric": metric,
                         "value": value(g_rows, "teacher", w, metric)})
    table = "\n".join(lines)
    wall = "\n".join(f"- {name}: {t:.0f} s" for name, t in times.items())
    out = Path(args.out)
    stem = f"guidance-sweep-{args.guided_name}" if args.guided_name else f"guidance-sweep-{args.law}-s{args.steps}"
    (out / f"{stem}.png").write_bytes(guidance_png(plot, f"digits: one guided student vs fixed-w students "
                                                         f"({args.steps} steps each, {args.law} w)"))
    (out / f"{stem}.md").write_text(f"{table}\n\nall pass: {ok_all}\n\nwall time per run:\n{wall}\n")
    print(table, f"\nall pass: {ok_all}\n{wall}")


if __name__ == "__main__":
    main()
