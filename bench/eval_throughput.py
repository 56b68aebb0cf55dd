"""Evaluation throughput on the SD1.5 architecture (random weights): the project's image-protocol path, per stage.

python bench/eval_throughput.py [--batches 16,32] [--iters 3] [--warmup 1] [--out OUT.json]
python bench/eval_throughput.py --tiny     (CPU smoke run on `dmd_core.tiny` components, batch 2)

Per batch of B captions, in one process, timed stage by stage (torch.cuda.synchronize around each, wall clock),
exactly as `tasks/eval_protocols.py` `image_protocol` runs them:
  encode   `Teacher.encode(prompts)`: byte tokenizer + CLIP ViT-L/14 text tower
  unet     one-step generator `Generator(NetDenoiser, t=999)`: one UNet2DConditionModel pass on 64x64x4 latents
  decode   `Teacher.decode` (AutoencoderKL to 512x512), /2 + 0.5, clamp, `.float().cpu()`
  protocol `dmd_core.evaluation.to_protocol_images(images, 256)` (uint8, center crop + PIL Lanczos, CPU)
  fid      `dmd_core.fid.features(list(images), inception, "clean", device)`; of which `preprocess` (clean-fid's
           per-image PIL bicubic resize to 299, CPU) is timed alone as fid_preprocess, the rest is the GPU part
  clip     `dmd_core.evaluation.ClipScorer` (open_clip ViT-g-14, fp32, random init, DMD2 prefix, resize=256);
           its CPU part (to_pil, crop+256 Lanczos, open_clip preprocess to 224) is timed alone as clip_preprocess
  cfg_step one teacher CFG evaluation at guidance 3 (`with_guidance`: 2 UNet passes per image), for the
           teacher baselines
Generation runs in fp32 (`evaluate.precision=fp32`) and, as an option, under bf16 autocast (encode, UNet,
decode, CFG step); Inception and CLIP stay fp32 in both (they define the metric). `chain` is the wall time of
encode -> ... -> clip run back to back, the images/s the evaluate stage would see.

Inception: clean-fid's TorchScript `inception-2015-12-05.pt` is not available offline, so an architecture
stand-in with the same FLOPs is used: torchvision `inception_v3(weights=None, aux_logits=False,
init_weights=False)`, fc -> Identity (2048-d pool features), wrapped to take clean-fid's input contract
(float (B, 3, 299, 299) in [0, 255]).
Writes JSON to --out (default $OUT/eval_throughput.json) and prints it.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import io
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sd15_train_step import build_teacher  # noqa: E402

from dmd_core.clip_score import DMD2_PREFIX, center_crop_resize as clip_crop_resize, load_clip, to_pil  # noqa: E402
from dmd_core.denoisers import with_guidance  # noqa: E402
from dmd_core.evaluation import ClipScorer, to_protocol_images  # noqa: E402
from dmd_core.fid import features, preprocess  # noqa: E402
from dmd_core.generator import Generator  # noqa: E402
from dmd_core.protocols import center_crop_resize  # noqa: E402

CAPTIONS = ["A man riding a wave on top of a surfboard.", "A kitchen with a stove, a sink and white cabinets.",
            "Two giraffes standing next to each other in a field.", "A plate of food with broccoli and rice.",
            "A red double decker bus driving down a street.", "A cat laying on top of a laptop computer.",
            "A group of people flying kites on a beach.", "A clock tower in the middle of a city at night."]
GUIDANCE = 3.0
N_COCO, N_REF, PNDM_STEPS = 30_000, 40_504, 50


class InceptionStandIn(torch.nn.Module):
    """torchvision Inception-V3 (random, no aux head, fc removed) behind clean-fid's contract: [0, 255] -> (B, 2048)."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import inception_v3

        torch.manual_seed(0)
        self.net = inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=False)
        self.net.fc = torch.nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x / 127.5 - 1.0)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Clock:
    """Wall seconds of named stages, synchronising the GPU before and after each."""

    def __init__(self, device: str) -> None:
        self.device, self.t = device, {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        sync(self.device)
        t0 = time.perf_counter()
        yield
        sync(self.device)
        self.t[name] = time.perf_counter() - t0


def one_batch(ctx: dict, B: int, autocast: bool, device: str) -> dict:
    """One batch through the evaluate path; returns seconds per stage (whole batch)."""
    teacher, G, cfg_D, inception, scorer = ctx["teacher"], ctx["G"], ctx["cfg"], ctx["inception"], ctx["clip"]
    prompts = [CAPTIONS[i % len(CAPTIONS)] for i in range(B)]
    z = torch.randn(B, *teacher.sample_shape)  # drawn on the CPU, as image_protocol does
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if autocast and device == "cuda"
           else contextlib.nullcontext())
    clock = Clock(device)
    with clock("chain"), torch.no_grad():
        with amp:
            with clock("encode"):
                cond = teacher.encode(prompts)
            with clock("unet"):
                x = G(z.to(device), cond, generator=torch.Generator(device).manual_seed(1))
            with clock("decode"):
                images = (teacher.decode(x) / 2 + 0.5).clamp(0, 1).float().cpu()
        with clock("protocol"):
            arr = to_protocol_images(images, 256)
        with clock("fid"):
            feats = features(list(arr), inception, "clean", device=device)
        with clock("clip"):
            cos = scorer(arr, prompts)
    assert feats.shape[0] == B and cos.shape[0] == B
    with clock("fid_preprocess"):
        pre = preprocess(list(arr), "clean")
    with clock("fid_gpu"), torch.no_grad():
        inception(pre.to(device)).cpu()
    with clock("clip_preprocess"):
        pils = [clip_crop_resize(to_pil(torch.from_numpy(a).permute(2, 0, 1)), 256) for a in arr]
        torch.stack([scorer.preprocess(p) for p in pils])
    t = torch.full((B,), 981, device=device)
    xt = torch.randn(B, *teacher.sample_shape, device=device)
    with torch.no_grad(), amp, clock("cfg_step"):
        cfg_D(xt, t, cond)
    return clock.t


def build(tiny: bool, device: str) -> dict:
    t0 = time.time()
    teacher = build_teacher(tiny, device)
    G = Generator(teacher.denoiser, teacher.process, (999,)).eval()  # same architecture as a student checkpoint
    cfg = with_guidance(teacher.denoiser, GUIDANCE, teacher.null_cond)
    if tiny:
        from dmd_core.tiny import TinyInception, register_tiny_clip

        inception, clip_name = TinyInception(), register_tiny_clip()
    else:
        inception, clip_name = InceptionStandIn(), "ViT-g-14"
    inception = inception.to(device).eval().requires_grad_(False)
    t1 = time.time()
    clip = load_clip(clip_name, random_init=True, device=device)
    scorer = ClipScorer(*clip, prefix=DMD2_PREFIX, resize=256)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    info = {"unet_params": count(teacher.net), "vae_params": count(teacher.vae),
            "text_encoder_params": count(teacher.text_encoder), "inception_params": count(inception),
            "clip_params": count(clip[0]), "build_sd_s": round(t1 - t0, 1), "build_clip_s": round(time.time() - t1, 1)}
    return {"teacher": teacher, "G": G, "cfg": cfg, "inception": inception, "clip": scorer, "info": info}


def reference_per_image(inception, device: str, n: int = 32) -> dict:
    """Per-image seconds for the reference statistics: JPEG decode (640x480 stand-in), center crop + Lanczos 256,
    clean-fid preprocess + Inception. Real val2014 JPEGs are natural images; a smooth synthetic one stands in."""
    from PIL import Image

    yy, xx = np.mgrid[0:480, 0:640]
    base = np.stack([(xx * 0.4) % 256, (yy * 0.5) % 256, ((xx + yy) * 0.2) % 256], -1)
    noisy = np.clip(base + np.random.default_rng(0).normal(0, 8, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    clock = Clock(device)
    with clock("decode"):
        imgs = [np.array(Image.open(io.BytesIO(data)).convert("RGB")) for _ in range(n)]
    with clock("crop_resize"):
        arr = np.stack([center_crop_resize(a, 256) for a in imgs])
    with clock("fid"):
        features(list(arr), inception, "clean", device=device)
    return {k: v / n for k, v in clock.t.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke run on tiny components")
    p.add_argument("--batches", default="16,32")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "eval_throughput.json"))
    args = p.parse_args()
    device = "cpu" if args.tiny else "cuda"
    batches = [2] if args.tiny else [int(b) for b in args.batches.split(",")]
    warmup, iters = (1, 1) if args.tiny else (args.warmup, args.iters)
    ctx = build(args.tiny, device)
    result = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
              "cpu_threads": torch.get_num_threads(), "date": datetime.date.today().isoformat(), "tiny": args.tiny,
              "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, **ctx["info"], "warmup": warmup,
              "iters": iters, "guidance": GUIDANCE, "pndm_cfg_evals": PNDM_STEPS + 1, "runs": []}
    print(json.dumps(result), flush=True)
    ref_ms = None
    for B in batches:
        for prec in args.precisions.split(","):
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                times = [one_batch(ctx, B, prec == "bf16", device) for _ in range(warmup + iters)][warmup:]
            except torch.OutOfMemoryError as err:
                result["runs"].append({"batch": B, "precision": prec, "oom": str(err).splitlines()[0][:200]})
                gc.collect()
                torch.cuda.empty_cache()
                continue
            med = {k: statistics.median(t[k] for t in times) for k in times[0]}
            per_img = {k: round(v / B, 5) for k, v in med.items()}
            gen = per_img["encode"] + per_img["unet"] + per_img["decode"]
            score = per_img["protocol"] + per_img["fid"] + per_img["clip"]
            chain = per_img["chain"]
            # Teacher baselines: the same path with the one UNet pass replaced by CFG evaluations.
            teacher50 = chain - per_img["unet"] + (PNDM_STEPS + 1) * per_img["cfg_step"]
            teacher1 = chain - per_img["unet"] + per_img["cfg_step"]
            if ref_ms is None:
                ref = reference_per_image(ctx["inception"], device)
                ref_ms = {k: round(v, 5) for k, v in ref.items()}
                result["reference_s_per_image"] = ref_ms
            ref_img = sum(ref_ms.values())
            proj = {"student_1step_s": round(N_COCO * chain), "teacher_pndm50_cfg_s": round(N_COCO * teacher50),
                    "teacher_1step_cfg_s": round(N_COCO * teacher1), "reference_val2014_s": round(N_REF * ref_img)}
            proj["total_s"] = sum(proj.values())
            proj["total_h"] = round(proj["total_s"] / 3600, 2)
            run = {"batch": B, "precision": prec + ("" if prec == "fp32" else " autocast (generation only)"),
                   "s_per_image": per_img, "generation_s_per_image": round(gen, 5),
                   "scoring_s_per_image": round(score, 5), "images_per_s": round(1 / chain, 2),
                   "images_per_s_generation_only": round(1 / gen, 2),
                   "teacher_pndm50_s_per_image": round(teacher50, 4), "coco30k_projection": proj,
                   "batch_s_all": [{k: round(v, 4) for k, v in t.items()} for t in times]}
            if device == "cuda":
                run["peak_GB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            result["runs"].append(run)
            print(json.dumps({k: v for k, v in run.items() if k != "batch_s_all"}), flush=True)
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
