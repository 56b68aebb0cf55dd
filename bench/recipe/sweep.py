"""GPU sweep driver: phase 1 trains teachers (+ pairs, teacher metrics), phase 2 runs distill configs in parallel.

python bench/recipe/sweep.py SWEEP_NAME OUT_DIR DEADLINE_S ; writes OUT_DIR/results.jsonl and OUT_DIR/teachers.tar.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

T_EPS1 = {"layers_per_block": 1}
T_V1 = {"layers_per_block": 1, "prediction_type": "v_prediction"}
T_EPS2 = {"layers_per_block": 2}
T_V2 = {"layers_per_block": 2, "prediction_type": "v_prediction"}
BASE = {"regression": "mse", "lambda_reg": 1.0, "batch_size": 64, "ema_decay": 0.99, "bf16": False,
        "fake_updates_per_generator": 2}


def d(**kw) -> dict:
    return {**BASE, **kw}


V = d(generator_timesteps=[999], lr=2e-4, lr_fake=2e-4, fake_updates_per_generator=1)

M = {**V, "ema_decay": 0.98, "lambda_reg": 2.0, "guidance": 1.25}

SWEEPS = {
    "s3": {
        "teachers": [],
        "runs": [
            *[(f"M_p2048_s{s}", T_V1, M, 2048, s) for s in (0, 1, 2, 3)],
            *[(f"M_p1024_s{s}", T_V1, M, 1024, s) for s in (0, 1, 2)],
            *[(f"M_p1024_d25_s{s}", T_V1, M, 1024, s, {"pair_steps": 25}) for s in (0, 1)],
            *[(f"M_lam4_s{s}", T_V1, {**M, "lambda_reg": 4.0}, 1024, s) for s in (0, 1)],
            *[(f"M_cfg15_s{s}", T_V1, {**M, "guidance": 1.5}, 1024, s) for s in (0, 1)],
            *[(f"M_b32_s{s}", T_V1, {**M, "batch_size": 32}, 1024, s) for s in (0, 1)],
            ("M_ema99_s0", T_V1, {**M, "ema_decay": 0.99}, 1024, 0),
            ("M_nocfg_s0", T_V1, {**M, "guidance": 1.0}, 1024, 0),
            ("M_noema98_s1", T_V1, {**M, "ema_decay": 0.99}, 1024, 1),
            ("M_regonly_s0", T_V1, {**M, "dm_weight": 0.0}, 1024, 0),
        ],
        "steps": 400, "eval_every": 25,
    },
    "s2": {
        "teachers": [("v1", T_V1, [999], [1024, 2048])],
        "pair_seeds": [0, 1, 2],
        "runs": [
            ("A_s0", T_V1, V, 2048, 0), ("A_s1", T_V1, V, 2048, 1), ("A_s2", T_V1, V, 2048, 2),
            ("B_lr3", T_V1, {**V, "lr": 3e-4, "lr_fake": 3e-4}, 2048),
            ("C_ema98_s0", T_V1, {**V, "ema_decay": 0.98}, 2048, 0),
            ("C_ema98_s1", T_V1, {**V, "ema_decay": 0.98}, 2048, 1),
            ("D_ema95", T_V1, {**V, "ema_decay": 0.95}, 2048),
            ("E_lam2", T_V1, {**V, "lambda_reg": 2.0}, 2048),
            ("F_lam4", T_V1, {**V, "lambda_reg": 4.0}, 2048),
            ("G_cfg125", T_V1, {**V, "guidance": 1.25}, 2048),
            ("H_regonly", T_V1, {**V, "dm_weight": 0.0}, 2048),
            ("I_fake4", T_V1, {**V, "lr_fake": 4e-4}, 2048),
            ("J_b32", T_V1, {**V, "batch_size": 32}, 2048),
            ("K_lr1_s1", T_V1, {**V, "lr": 1e-4, "lr_fake": 1e-4}, 2048, 1),
            ("K_lr1_s2", T_V1, {**V, "lr": 1e-4, "lr_fake": 1e-4}, 2048, 2),
            ("L_p1024", T_V1, V, 1024),
            ("M_combo", T_V1, {**V, "ema_decay": 0.98, "lambda_reg": 2.0, "guidance": 1.25}, 2048),
            ("N_k2", T_V1, {**V, "fake_updates_per_generator": 2}, 2048),
            ("O_eps", T_EPS1, d(generator_timesteps=[500], lr=5e-5, lr_fake=1e-4, guidance=1.5,
                                fake_updates_per_generator=1), 2048),
        ],
        "steps": 800, "eval_every": 50,
    },
    "smoke": {
        "teachers": [("v1", {**T_V1, "train_steps": 5}, [999], [128])],
        "runs": [("v_smoke", {**T_V1, "train_steps": 5}, d(generator_timesteps=[999], steps=2), 128)],
        "steps": 2, "eval_every": 1,
    },
    "s1": {
        "teachers": [("eps1", T_EPS1, [400, 500, 600, 700, 800, 999], [2048]),
                     ("v1", T_V1, [600, 800, 999], [1024, 2048, 4096]),
                     ("eps2", T_EPS2, [600, 999], [2048]),
                     ("v2", T_V2, [999], [2048])],
        "runs": [
            ("e_base", T_EPS1, d(generator_timesteps=[600], lr=2e-5), 2048),
            ("e_lr5", T_EPS1, d(generator_timesteps=[600], lr=5e-5, lr_fake=1e-4), 2048),
            ("e_t500", T_EPS1, d(generator_timesteps=[500], lr=5e-5, lr_fake=1e-4), 2048),
            ("e_t700", T_EPS1, d(generator_timesteps=[700], lr=2e-5, lr_fake=1e-4), 2048),
            ("e_k1", T_EPS1, d(generator_timesteps=[600], lr=5e-5, lr_fake=1e-4, fake_updates_per_generator=1), 2048),
            ("e_lam4", T_EPS1, d(generator_timesteps=[600], lr=5e-5, lr_fake=1e-4, lambda_reg=4.0), 2048),
            ("e_cfg15", T_EPS1, d(generator_timesteps=[600], lr=5e-5, lr_fake=1e-4, guidance=1.5), 2048),
            ("e_regonly", T_EPS1, d(generator_timesteps=[600], lr=5e-5, dm_weight=0.0), 2048),
            ("v_lr5", T_V1, d(generator_timesteps=[999], lr=5e-5, lr_fake=1e-4), 2048),
            ("v_lr1", T_V1, d(generator_timesteps=[999], lr=1e-4, lr_fake=1e-4), 2048),
            ("v_lr2", T_V1, d(generator_timesteps=[999], lr=2e-4, lr_fake=2e-4), 2048),
            ("v_k1", T_V1, d(generator_timesteps=[999], lr=1e-4, lr_fake=1e-4, fake_updates_per_generator=1), 2048),
            ("v_lam025", T_V1, d(generator_timesteps=[999], lr=1e-4, lr_fake=1e-4, lambda_reg=0.25), 2048),
            ("v_cfg15", T_V1, d(generator_timesteps=[999], lr=1e-4, lr_fake=1e-4, guidance=1.5), 2048),
            ("v_regonly", T_V1, d(generator_timesteps=[999], lr=1e-4, dm_weight=0.0), 2048),
            ("v_huber", T_V1, d(generator_timesteps=[999], lr=1e-4, lr_fake=1e-4, regression="pseudo_huber",
                                lambda_reg=0.25), 2048),
            ("v_p1024", T_V1, d(generator_timesteps=[999], lr=1e-4, lr_fake=1e-4), 1024),
            ("v_p4096", T_V1, d(generator_timesteps=[999], lr=1e-4, lr_fake=1e-4), 4096),
            ("e2_lr5", T_EPS2, d(generator_timesteps=[600], lr=5e-5, lr_fake=1e-4), 2048),
            ("v2_lr1", T_V2, d(generator_timesteps=[999], lr=1e-4, lr_fake=1e-4), 2048),
        ],
        "steps": 1500,
    },
}


def launch(spec: dict, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(HERE / "experiment.py"), json.dumps(spec)], cwd=ROOT, env=env,
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT)


def wait_all(procs: list, deadline: float) -> None:
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(2)
    for p in procs:
        if p.poll() is None:
            p.kill()


def main(name: str, out: str, budget_s: float) -> None:
    start = time.time()
    deadline = start + budget_s
    sweep, out_dir, logs = SWEEPS[name], Path(out), Path("/tmp/sweep_logs")
    logs.mkdir(exist_ok=True)
    procs = []
    for tag, tcfg, t_stars, pairs in sweep.get("teachers", []):
        procs.append(launch({"mode": "teacher", "tag": tag, "teacher": tcfg, "t_stars": t_stars, "pairs": pairs,
                             "pair_seeds": sweep.get("pair_seeds", [0]), "threads": 1}, logs / f"teacher_{tag}.log"))
    wait_all(procs, deadline)
    print(f"phase 1 done at {time.time() - start:.0f}s", flush=True)
    procs = []
    for tag, tcfg, dcfg, n_pairs, *rest in sweep["runs"]:
        seed = rest[0] if rest else 0
        extra = rest[1] if len(rest) > 1 else {}
        procs.append(launch({**extra, "tag": tag, "teacher": tcfg, "distill": {**dcfg, "steps": sweep["steps"]},
                             "n_pairs": n_pairs, "seed": seed, "with_teacher": False, "threads": 1,
                             "eval_every": sweep.get("eval_every", 100)}, logs / f"run_{tag}.log"))
    wait_all(procs, deadline)
    print(f"phase 2 done at {time.time() - start:.0f}s", flush=True)
    with open(out_dir / "results.jsonl", "w") as f:
        for p in sorted(logs.glob("*.log")):
            f.write(f"### {p.name}\n" + p.read_text())
    with tarfile.open(out_dir / "teachers.tar", "w") as tar:
        for p in (HERE / "cache").glob("teacher-*.safetensors"):
            tar.add(p, arcname=p.name)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]))
