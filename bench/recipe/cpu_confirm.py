"""CPU confirmation of the recipe: times each stage (wall and process CPU seconds) with torch.set_num_threads(2)."""
from __future__ import annotations

import json
import sys
import time

import torch

sys.path.insert(0, __import__("os").path.dirname(__file__))
import experiment as ex  # noqa: E402
from dmd_core.config import DistillConfig, TeacherConfig  # noqa: E402
from dmd_core.metrics import train_classifier  # noqa: E402
from dmd_core.samplers import ddim_sample  # noqa: E402
from dmd_core.processes import timestep_grid  # noqa: E402
from dmd_core.streams import TensorStream  # noqa: E402
from dmd_core.trainer import DMDTrainer  # noqa: E402

TEACHER = TeacherConfig(layers_per_block=1, prediction_type="v_prediction")
DISTILL = DistillConfig(steps=400, batch_size=64, lr=2e-4, lr_fake=2e-4, fake_updates_per_generator=1,
                        ema_decay=0.98, generator_timesteps=[999], guidance=1.25, regression="mse", lambda_reg=4.0)


class Clock:
    def __init__(self):
        self.w, self.c = time.time(), time.process_time()

    def lap(self, name: str, **kw) -> None:
        w, c = time.time(), time.process_time()
        ex.log(stage=name, wall_s=round(w - self.w, 1), cpu_s=round(c - self.c, 1), **kw)
        self.w, self.c = w, c


def main(seed: int = 0, n_pairs: int = 1024, steps: int = 400, teacher_eval: bool = True) -> None:
    torch.set_num_threads(2)
    clk = Clock()
    images, labels = ex.load_digits_cached()
    train_classifier(images, labels, epochs=30, seed=0)  # timed only; FD uses the cached identical classifier
    clk.lap("classifier_train")
    ev = ex.Evaluator()
    teacher, schedule = ex.teacher_cached(TEACHER, "cpu")
    clk.lap("setup", floor=round(ev.floor(), 3))
    pairs = ex.teacher_pairs(teacher, schedule, n_pairs, seed, "cpu")
    clk.lap("pairs", n=n_pairs)
    cfg = DISTILL.model_copy(update={"seed": seed, "steps": steps})
    trainer = DMDTrainer(cfg, teacher, schedule, (1, 8, 8), num_classes=10, null_cond=10,
                         pairs=TensorStream(pairs, cfg.batch_size, seed), device="cpu")
    for step in range(1, steps + 1):
        trainer.train_step()
        if step % 100 == 0:
            clk.lap("distill", step=step, s_per_step=None)
            gen = trainer.ema_generator().eval()
            clk.lap("eval_student", step=step, **ev(lambda z, y: gen(z, y), "cpu"))
    if teacher_eval:
        grid = timestep_grid(schedule.T, 50)
        clk.lap("teacher_50", **ev(lambda z, y: ddim_sample(teacher, z, grid, schedule, y), "cpu"))
        one = trainer.ema_generator().__class__(teacher, schedule, [999])
        clk.lap("teacher_1step", **ev(lambda z, y: one(z, y), "cpu"))


if __name__ == "__main__":
    main(*[int(a) for a in sys.argv[1:]])
