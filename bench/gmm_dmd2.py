"""DMD2 on the 2-D Gaussian mixture of tests/test_gmm_toy.py: DM alone against DM + GAN on real mixture samples, no
regression pairs, through the real `DMDTrainer` on one CPU thread.

python bench/gmm_dmd2.py '{"steps": 8000, "gan": false, "ttur": 1, "seed": 0}'
python bench/gmm_dmd2.py '{"steps": 8000, "wg": 1, "seed": 0}'
python bench/gmm_dmd2.py '{"steps": 8000, "r1": 10, "lr": 2.5e-3, "lr_fake": 1.5e-3, "seed": 0}'   (every mode
    within 5 points on seeds 0-9; docs/digits.md)

The fake score is the toy's MLP; the GAN head (DMD2 §4.2) reads its second hidden layer (`layer`) as a 1x1 feature
map. Real samples: 65,536 draws of the mixture. Every `every` iterations it prints (iteration, the largest
|mode mass - 1/9|, median distance of a sample to its nearest mode), the nine mode masses of the EMA generator on
4,096 fixed noises, and the seconds so far. Keys: steps, seed, gan (true), wg / wd (GAN weights), ttur (5), lr
(5e-3), lr_fake (3e-3), ema (0.99), r1, hidden (128), layer (3), phases, every (1000).
"""
import json
import os
import sys
import time
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from test_gmm_toy import (MODE_STD, N_EVAL, START, GMMDenoiser, MLPDenoiser, blob_generator,  # noqa: E402
                          mode_centers, mode_masses)

from dmd_core.config import DistillConfig  # noqa: E402
from dmd_core.processes import VPDiscrete  # noqa: E402
from dmd_core.streams import TensorStream  # noqa: E402
from dmd_core.trainer import DMDTrainer  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    args = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {"steps": 8000}
    seed, gan, hidden = args.get("seed", 0), args.get("gan", True), args.get("hidden", 128)
    schedule, means = VPDiscrete.linear(), mode_centers()
    teacher = GMMDenoiser(means, MODE_STD, schedule)
    g = torch.Generator().manual_seed(seed + 11)
    y = means[torch.randint(0, len(means), (65536,), generator=g)] + MODE_STD * torch.randn(65536, 2, generator=g)
    real = TensorStream({"y": y}, batch_size=256, seed=seed)
    cfg = DistillConfig(steps=args["steps"], batch_size=256, lr=args.get("lr", 5e-3), lr_fake=args.get("lr_fake", 3e-3),
                        weight_decay=0.0, ema_decay=args.get("ema", 0.99), regression="none", bf16=False, seed=seed,
                        fake_updates_per_generator=args.get("ttur", 5), phases=args.get("phases"),
                        gan={"enabled": gan, "weight_generator": args.get("wg", 1.0),
                             "weight_discriminator": args.get("wd", 1.0), "r1_weight": args.get("r1", 0.0)})
    generator = blob_generator(schedule, torch.tensor(START), seed)
    torch.manual_seed(seed + 2)
    fake = MLPDenoiser(schedule, hidden=hidden)
    fake.backbone = types.SimpleNamespace(bottleneck=lambda net: (net[args.get("layer", 3)], hidden),
                                          features=lambda out: out[:, :, None, None])
    trainer = DMDTrainer(cfg, teacher, schedule, (2,), pairs=None, real=real if gan else None,
                         generator_init=generator, fake_init=fake, num_classes=0, prediction_type="epsilon")
    z = torch.randn(N_EVAL, 2, generator=torch.Generator().manual_seed(seed + 3))
    t0, last = time.time(), None
    for i in range(cfg.steps):
        trainer.train_step()
        if (i + 1) % args.get("every", 1000) == 0 or i + 1 == cfg.steps:
            with torch.no_grad():
                masses, dist = mode_masses(trainer.ema_generator()(z), means)
            last = (i + 1, round(float((masses - 1 / len(means)).abs().max()), 3), round(float(dist.median()), 3))
            print(last, [round(float(m), 3) for m in masses], round(time.time() - t0), flush=True)
    print("FINAL", json.dumps(args), last)


if __name__ == "__main__":
    main()
