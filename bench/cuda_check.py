"""CUDA check of the trainer: bf16 autocast steps, exact resume on the GPU, multi-step sampling with a CUDA RNG.

python bench/cuda_check.py OUT.json   (needs a CUDA device; writes the measurements as JSON)
"""
from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.helpers import make_trainer  # noqa: E402


def build(device: str, bf16: bool):
    return make_trainer(bf16=bf16, device=device)


def main(out_path: str) -> None:
    torch.use_deterministic_algorithms(True)
    result: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for bf16 in (True, False):
        straight = build("cuda", bf16)
        t0 = time.time()
        metrics = [straight.train_step() for _ in range(6)]
        torch.cuda.synchronize()
        first = build("cuda", bf16)
        for _ in range(3):
            first.train_step()
        files = first.state_files()
        resumed = build("cuda", bf16)
        resumed.load_state_files(files)
        for _ in range(3):
            resumed.train_step()
        diff = max(float((a - b).abs().max()) for a, b in zip(straight.G.denoiser.state_dict().values(),
                                                               resumed.G.denoiser.state_dict().values()))
        result[f"bf16={bf16}"] = {"finite_losses": all(torch.isfinite(torch.tensor(m.get("loss_fake", 0.0)))
                                                       for m in metrics),
                                  "skipped": sum(m["skipped"] for m in metrics),
                                  "resume_max_abs_diff_G": diff, "seconds_6_steps": round(time.time() - t0, 2)}
    g = torch.Generator("cuda").manual_seed(0)
    z = torch.randn(8, 1, 8, 8, device="cuda")
    x = straight.ema_generator()(z, torch.arange(8, device="cuda") % 10, generator=g)
    result["multistep_sample_shape"] = list(x.shape)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(sys.argv[1])
