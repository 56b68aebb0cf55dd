"""The whole pipeline on CUDA with `distill.compile=auto` against `compile=none`, same preset, same machine.

python bench/compile_auto_flow.py [--presets sd-tiny,pixel-tiny] [--out OUT.json]

Each run is `dmd run --preset P --set device=cuda --set distill.compile=MODE` in a fresh process with a fresh
artifact root (its own temporary Prefect server); the wall time covers every stage. The `auto` run's decision line
(`distill.compile=auto: ...`) is recorded. Writes JSON after each run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(preset: str, mode: str, root: str) -> dict:
    cmd = [sys.executable, "-c", "from flows.cli import main; main()", "run", "--preset", preset, "--root", root,
           "--set", "device=cuda", "--set", f"distill.compile={mode}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "PREFECT_HOME": os.path.join(root, ".prefect"), "TQDM_DISABLE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    row = {"wall_s": round(time.perf_counter() - t0, 1), "exit": proc.returncode}
    lines = (proc.stdout + proc.stderr).splitlines()
    row["decision"] = next((ln.strip() for ln in lines if "distill.compile=auto:" in ln), None)
    if proc.returncode:
        row["tail"] = "\n".join(lines[-15:])
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="sd-tiny,pixel-tiny")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "compile_auto_flow.json"))
    args = p.parse_args()
    import torch

    res = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(0),
           "torch": torch.__version__}
    for preset in args.presets.split(","):
        for mode in ("none", "auto"):
            res.setdefault(preset, {})[mode] = run(preset, mode, tempfile.mkdtemp(prefix=f"{preset}-{mode}-"))
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)
            print(json.dumps({preset: {mode: res[preset][mode]}}), flush=True)
        r = res[preset]
        r["auto_over_none"] = round(r["auto"]["wall_s"] / r["none"]["wall_s"], 3)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
