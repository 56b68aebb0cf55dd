"""Sampling speed of a DMD export against its teacher (the speed-up DMD exists for), on one run's artifacts.

python bench/sampling_speed.py ROOT RUN_NAME [N] [REPEATS]  -> prints a JSON line; both timed in this run.
"""
from __future__ import annotations

import json
import platform
import sys
import time

import torch

from dmd_core.pipeline import DMDPipeline
from storage.layout import EXPORT
from storage.models import local_folder
from tasks.context import open_run, run_teacher


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


@torch.no_grad()
def main(root: str, run_name: str, n: int = 1024, repeats: int = 3) -> dict:
    store, cfg = open_run(root, run_name)
    device = torch.device("cpu")
    teacher = run_teacher(store, cfg, device)
    with local_folder(store, EXPORT) as path:
        pipe = DMDPipeline.from_pretrained(path, low_cpu_mem_usage=False)
    z = torch.randn(n, *teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(n) % teacher.num_classes
    steps, guidance = cfg.evaluate.teacher_steps, cfg.pairs.guidance
    t_teacher = best_of(lambda: teacher.sample(cfg.pairs.solver, steps, z, labels, guidance), repeats)
    t_student = best_of(lambda: pipe(latents=z, class_labels=labels, output_type="latent"), repeats)
    out = {"device": f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
           "torch": torch.__version__, "n": n, "teacher_steps": cfg.evaluate.teacher_steps,
           "teacher_s": round(t_teacher, 3), "student_s": round(t_student, 3),
           "speedup": round(t_teacher / t_student, 1)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:]))
