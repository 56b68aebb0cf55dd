"""Evaluation at scale, SD1.5 architecture (random weights): today's image-protocol path against the fast one.

python bench/eval_fast.py [--n-base 256] [--n-fast 2048] [--batch 32] [--variants threads:tf32:device,...]
                          [--skip cpu_stages,extractor_precisions] [--out OUT.json]
python bench/eval_fast.py --tiny     (CPU smoke run on `dmd_core.tiny` components, eager, a few batches)

Both paths score a one-step student (a `Generator` at t = 999 over a copy of the teacher's denoiser) on the same
captions and noise, from noise to FID statistics and CLIP cosines, as `tasks/eval_protocols.py` `image_protocol`
does: `Teacher.encode` (text tower in fp32), the generator and `Teacher.decode` under bf16 autocast
(evaluate.precision=auto), images to [0, 1], `generate_images` (uint8, center crop + Lanczos to 256),
`ImageScores` (Inception features with clean-fid's resize to 299; CLIP ViT-g-14 with the DMD2 prefix and resize).
- today: eager fp32 weights, everything in one thread, Inception and CLIP in fp32;
- fast: `fast_generation` (bf16 weights, NHWC, fused QKV, UNet and decoder compiled with `reduce-overhead`),
  `generate_images(pool=..., fixed_batch=True)`, `ImageScores(pool=..., background=True)`: resizes in a thread
  pool, batch i scored in a worker thread while batch i + 1 is generated. Inception in fp32, CLIP in the
  precision each variant names, one timed run each; a variant ending in ":device" resizes on the GPU
  (`resize_on="device"`: protocol crop + Lanczos, clean-fid's resize to 299, CLIP's preprocess, PIL's values).
  Compilation is timed apart (the first two batches).
The device resizes are checked against PIL on one batch of the fast sampler's images (`device_resize_check`).
Then, on the fast run's images, each extractor precision against fp32 (FID statistics and CLIP cosines), and
whether the threaded scoring equals the sequential one bit for bit. Inception is the architecture stand-in of
bench/eval_throughput.py (clean-fid's TorchScript file is not available offline). Nothing is downloaded.
Writes JSON to --out (default $OUT/eval_fast.json) after every section and prints it.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import time
from functools import partial

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from eval_throughput import CAPTIONS, InceptionStandIn  # noqa: E402
from sd15_train_step import build_teacher  # noqa: E402

from dmd_core.clip_score import DMD2_PREFIX, load_clip  # noqa: E402
from dmd_core.evaluation import (ClipScorer, ImageScores, generate_images, image_pool,  # noqa: E402
                                 to_protocol_images)
from dmd_core.clip_score import device_preprocess, pil_stages, split_preprocess  # noqa: E402
from dmd_core.fid import (FeatureStats, device_features, extractor_precision, features, frechet_distance,  # noqa: E402
                          parallel_map, preprocess, to_uint8)
from dmd_core.generator import Generator  # noqa: E402
from dmd_core.inference import fast_generation, half_text_encoders  # noqa: E402

N_COCO = 30_000


class ScaledStandIn(torch.nn.Module):
    """The Inception stand-in with its features brought to unit scale (random weights shrink them to ~1e-7, where
    float64 Frechet distances are rounding noise): one fixed factor, from uniform-noise images, applied in fp32."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.net = InceptionStandIn().to(device).eval().requires_grad_(False)
        with torch.no_grad():
            probe = self.net(torch.rand(8, 3, 299, 299, generator=torch.Generator().manual_seed(0)).to(device) * 255)
        self.scale = float(1 / probe.float().std())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).float() * self.scale


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def sampler(teacher, body, device: torch.device):
    """sample(z, raw) -> images in [0, 1], float32: `tasks.eval_protocols.generating` at evaluate.precision=bf16."""

    def sample(z, raw):
        cond = teacher.encode(raw)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            x = teacher.decode(body(z.to(device), cond))
        return (x.float() / 2 + 0.5).clamp(0, 1)

    return sample


def build(tiny: bool, device: torch.device) -> dict:
    t0 = time.time()
    teacher = build_teacher(tiny, str(device))
    student = Generator(teacher.student(teacher.denoiser.state_dict()), teacher.process, (999,)).eval()
    if tiny:
        from dmd_core.tiny import TinyInception, register_tiny_clip

        inception, clip_name = TinyInception(), register_tiny_clip()
    else:
        inception, clip_name = ScaledStandIn(device), "ViT-g-14"
    inception = inception.to(device).eval().requires_grad_(False)
    t1 = time.time()
    with torch.device(device):  # random init on the GPU: ViT-g-14's 1.4 B parameters initialise slowly on a CPU
        torch.manual_seed(0)
        model, preprocess, tokenizer = load_clip(clip_name, random_init=True, device=device)
    info = {"build_sd_s": round(t1 - t0, 1), "build_clip_s": round(time.time() - t1, 1),
            "clip_params": sum(p.numel() for p in model.parameters())}
    return {"teacher": teacher, "student": student, "inception": inception, "clip": (model, preprocess, tokenizer),
            "info": info}


def scorer(ctx: dict, precision: str, resize_on: str = "cpu") -> ClipScorer:
    return ClipScorer(*ctx["clip"], prefix=DMD2_PREFIX, resize=256, precision=precision, resize_on=resize_on)


def evaluate(ctx, sample, z, prompts, batch, res, device, *, clip_precision="fp32", pool=None, fast=False,
             keep=False, resize_on="cpu", text=None) -> dict:
    """One model's images from noise to statistics and cosines, timed end to end (the GPU synchronised).
    resize_on "resident": the device resizes, and the images stay on the GPU until scored (`on_device`).
    `text`: the captions' CLIP text features, computed once per protocol beforehand (`ClipScorer.with_text`)."""
    on_device = resize_on == "resident"
    resize_on = "device" if on_device else resize_on
    clip = scorer(ctx, clip_precision, resize_on)
    if text is not None:
        clip = clip.with_text(prompts, text)
    scores = ImageScores(ctx["inception"], "clean", device, clip, pool=pool,
                         background=fast and not on_device, resize_on=resize_on)
    kept = []
    sync(device)
    t0 = time.perf_counter()
    for images, captions in generate_images(sample, z, prompts, batch, res, pool=pool, fixed_batch=fast,
                                            resize_on=resize_on, on_device=on_device):
        scores.update(images, captions)
        if keep:
            kept.append(images.cpu().numpy() if on_device else images)
    stats, cosines = scores.stats, torch.cat(scores.cosines)
    sync(device)
    seconds = time.perf_counter() - t0
    return {"n": z.shape[0], "seconds": round(seconds, 2), "images_per_s": round(z.shape[0] / seconds, 2),
            "stats": stats.compute(), "cosines": cosines, "images": np.concatenate(kept) if keep else None}


def stats_of(feats: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) merged batch by batch, as `ImageScores` accumulates them."""
    s = FeatureStats()
    for i in range(0, len(feats), batch):
        s.update(feats[i:i + batch])
    return s.compute()


@contextlib.contextmanager
def strict_fp32():
    """fp32 with TF32 off for matrix multiplies and cuDNN convolutions (torch allows it for convolutions by default)."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def deviations(ctx, images: np.ndarray, prompts: list[str], batch: int, device, pool, fast_run: dict,
               deadline: float) -> dict:
    """Each extractor precision against fp32 on the same images (FID of the second half against the first half's
    fp32 statistics, feature and CLIP cosine deviations) while time is left; threaded vs sequential bit for bit."""
    feats, cos, secs = {}, {}, {}
    chunks = range(0, len(images), batch)
    for p in ("fp32", "fp16", "tf32", "bf16", "fp32-strict"):
        if feats and time.time() > deadline:
            break
        precision = "fp32" if p == "fp32-strict" else p
        threads = None if p == "fp32" else pool  # fp32: the sequential loop, to compare with the threaded run
        clip = scorer(ctx, precision)
        sync(device)
        t0 = time.perf_counter()
        with strict_fp32() if p == "fp32-strict" else contextlib.nullcontext():
            feats[p] = np.concatenate([features(list(images[i:i + batch]), ctx["inception"], "clean", device=device,
                                                pool=threads, precision=precision) for i in chunks])
            cos[p] = torch.cat([clip(images[i:i + batch], prompts[i:i + batch], threads) for i in chunks])
        sync(device)
        secs[p] = round(time.perf_counter() - t0, 2)
    mu, sigma = stats_of(feats["fp32"], batch)
    run_mu, run_sigma = fast_run["stats"]
    clip_p = fast_run["clip_precision"]
    out = {"n_images": len(images), "threaded_background_fid_stats_equal_sequential":
           bool(np.array_equal(mu, run_mu) and np.array_equal(sigma, run_sigma))}
    if clip_p in cos:
        out[f"threaded_background_clip_{clip_p}_equal_recomputed"] = bool(torch.equal(cos[clip_p], fast_run["cosines"]))
    half = len(images) // 2
    ref = stats_of(feats["fp32"][:half], batch)
    t0 = time.perf_counter()
    fid_fp32 = frechet_distance(*stats_of(feats["fp32"][half:], batch), *ref)
    out["frechet_distance_s"] = round(time.perf_counter() - t0, 1)
    out["fid_second_half_vs_first_half_fp32"] = fid_fp32
    out["by_precision"] = {}
    for p in feats:
        mu_p, sigma_p = stats_of(feats[p], batch)
        d = (cos[p] - cos["fp32"]).abs()
        row = {"seconds_features_and_clip": secs[p],
               "mu_max_abs_dev": float(np.abs(mu_p - mu).max()),
               "sigma_rel_frobenius_dev": float(np.linalg.norm(sigma_p - sigma) / np.linalg.norm(sigma)),
               "feature_max_abs_dev": float(np.abs(feats[p] - feats["fp32"]).max()),
               "feature_max_abs": float(np.abs(feats["fp32"]).max()),
               "clip_mean": float(cos[p].double().mean()),
               "clip_mean_delta": float(cos[p].double().mean() - cos["fp32"].double().mean()),
               "clip_per_sample_max_abs_dev": float(d.max()), "clip_per_sample_mean_abs_dev": float(d.mean())}
        if p != "fp32" and time.time() < deadline + 60:
            fid_p = frechet_distance(*stats_of(feats[p][half:], batch), *ref)
            row.update(fid_second_half=fid_p, fid_delta=fid_p - fid_fp32, fid_rel_delta=(fid_p - fid_fp32) / fid_fp32)
        out["by_precision"][p] = row
    return out


def cpu_stages(ctx, images: np.ndarray, pools: dict, batch: int) -> dict:
    """ms per image of each CPU stage alone, in one thread and in each pool: the protocol's Lanczos 512 -> 256,
    clean-fid's resize to 299 (+ ToTensor), CLIP's crop + Lanczos 256 and preprocess."""
    from dmd_core.clip_score import _portable, pil_stages, split_preprocess
    from dmd_core.fid import preprocess

    big = np.concatenate([images, images], axis=2).repeat(2, axis=1)[:, :512, :512]  # 512x512 uint8 stand-ins
    pil_part, tensor_part = split_preprocess(ctx["clip"][1])
    clip_fn = partial(pil_stages, pil_preprocess=pil_part, resize=256)
    stages = {"protocol_resize": lambda b, pool: to_protocol_images(torch.from_numpy(b).permute(0, 3, 1, 2)
                                                                    .float() / 255, 256, pool),
              "cleanfid_preprocess": lambda b, pool: preprocess(list(b), "clean", pool),
              "clip_preprocess": lambda b, pool: [tensor_part(x) for x in parallel_map(
                  clip_fn, [_portable(torch.from_numpy(a).permute(2, 0, 1)) for a in b], pool)]}
    out = {}
    for name, fn in stages.items():
        data = big if name == "protocol_resize" else images
        for pool_name, pool in {"one_thread": None, **pools}.items():
            fn(data[:batch], pool)  # warm-up (a process pool starts its workers)
            t0 = time.perf_counter()
            for i in range(0, len(data), batch):
                fn(data[i:i + batch], pool)
            out[f"{name}_{pool_name}"] = round(1000 * (time.perf_counter() - t0) / len(data), 2)
    return out


def generation_only(sample, z, prompts, batch, res, device, pool, resize_on="cpu") -> dict:
    """The fast sampler alone through `generate_images` (uint8 protocol images on the CPU), nothing scored."""
    sync(device)
    t0 = time.perf_counter()
    for _ in generate_images(sample, z, prompts, batch, res, pool=pool, fixed_batch=True, resize_on=resize_on):
        pass
    seconds = time.perf_counter() - t0
    return {"n": z.shape[0], "seconds": round(seconds, 2), "images_per_s": round(z.shape[0] / seconds, 2)}


def agreement(images: np.ndarray, base: np.ndarray, batch: int, device) -> dict:
    """The fast path's images against today's on the same noise and captions; device against CPU quantisation."""
    n, diff = len(base), np.abs(images[:len(base)].astype(int) - base.astype(int))
    x = torch.rand(batch, 3, 64, 64, device=device)
    return {"images_compared": n, "max_abs_uint8": int(diff.max()), "mean_abs_uint8": float(diff.mean()),
            "equal_fraction": float((diff == 0).mean()),
            "to_uint8_device_equals_cpu": bool(torch.equal(to_uint8(x), to_uint8(x.cpu())))}


def device_resize_check(ctx, sample, z, prompts, batch, res, device) -> dict:
    """One batch of the sampler's images: each device resize against PIL's (bytes, float values, features,
    cosines), and how far apart the two paths' features and cosines are when not equal."""
    with torch.no_grad():
        images01 = sample(z[:batch], prompts[:batch])
    arr = to_protocol_images(images01, res)
    arr_device = to_protocol_images(images01, res, resize_on="device")
    pre = preprocess(list(arr), "clean")
    pre_device = preprocess(list(arr), "clean", resize_on="device", device=device).cpu()
    feats = features(arr, ctx["inception"], "clean", device=device)
    feats_device = features(arr, ctx["inception"], "clean", device=device, resize_on="device")
    cos = scorer(ctx, "fp32")(arr, prompts[:batch])
    cos_device = scorer(ctx, "fp32", "device")(arr, prompts[:batch])
    model, pre_clip, _ = ctx["clip"]
    pil_part, tensor_part = split_preprocess(pre_clip)
    clip_in = torch.stack([tensor_part(pil_stages(a, pil_part, 256)) for a in arr])
    clip_in_device = device_preprocess(torch.from_numpy(arr).permute(0, 3, 1, 2).to(device), pre_clip, 256).cpu()
    return {"images": batch, "source_size": list(images01.shape[2:]),
            "protocol_images_equal": bool(np.array_equal(arr, arr_device)),
            "cleanfid_299_inputs_equal": bool(torch.equal(pre, pre_device)),
            "clip_inputs_equal": bool(torch.equal(clip_in, clip_in_device)),
            "inception_features_equal": bool(np.array_equal(feats, feats_device)),
            "inception_features_max_abs_dev": float(np.abs(feats - feats_device).max()),
            "clip_cosines_equal": bool(torch.equal(cos, cos_device)),
            "clip_cosines_max_abs_dev": float((cos - cos_device).abs().max())}


def breakdown(ctx, sample, z, prompts, batch, res, device, iters: int = 5) -> dict:
    """ms per image of each part of the fast path alone, on one batch (the GPU synchronised around each): the
    sampler, the protocol resize, Inception with its resize, CLIP (tf32) whole and its two towers, the CPU's
    statistics update."""
    from dmd_core.clip_score import tokenize_captions

    zb, cb = z[:batch], prompts[:batch]
    with torch.no_grad():
        images01 = sample(zb, cb)
    arr = to_protocol_images(images01, res, resize_on="device", on_device=True)
    clip = scorer(ctx, "tf32", "device")
    model = ctx["clip"][0]
    pre = device_preprocess(arr.permute(0, 3, 1, 2), ctx["clip"][1], 256)
    tokens = tokenize_captions(cb, ctx["clip"][2], DMD2_PREFIX).to(device)
    feats = device_features(arr, ctx["inception"], "clean").cpu().numpy()

    def towers(fn):
        def run():
            with torch.no_grad(), extractor_precision("tf32", device):
                fn()
        return run

    teacher, body = ctx["teacher"], ctx["fast_body"]
    cond = teacher.encode(cb)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        x0 = body(zb.to(device), cond)

    def autocast(fn):
        def run():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                fn()
        return run

    bf16_teacher = half_text_encoders(teacher)  # its text encoders copied in bf16, for their time alone
    parts = {"sample": lambda: sample(zb, cb),
             "sample_caption_encoding": lambda: teacher.encode(cb),
             "sample_caption_encoding_bf16_weights": lambda: bf16_teacher.encode(cb),
             "sample_generator": autocast(lambda: body(zb.to(device), cond)),
             "sample_decode": autocast(lambda: teacher.decode(x0)),
             "protocol_resize": lambda: to_protocol_images(images01, res, resize_on="device", on_device=True),
             "inception_with_resize": lambda: device_features(arr, ctx["inception"], "clean"),
             "clip_tf32_whole": lambda: clip.on_device(arr, cb),
             "clip_preprocess": lambda: device_preprocess(arr.permute(0, 3, 1, 2), ctx["clip"][1], 256),
             "clip_tokenize": lambda: tokenize_captions(cb, ctx["clip"][2], DMD2_PREFIX),
             "clip_image_tower_tf32": towers(lambda: model.encode_image(pre)),
             "clip_text_tower_tf32": towers(lambda: model.encode_text(tokens)),
             "feature_stats_update_cpu": lambda: FeatureStats().update(feats)}
    out = {}
    for name, fn in parts.items():
        with torch.no_grad():
            fn()
            sync(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            sync(device)
        out[name] = round(1000 * (time.perf_counter() - t0) / (iters * batch), 3)
    return out


def public(run: dict) -> dict:
    return {k: v for k, v in run.items() if k not in ("stats", "cosines", "images")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke run on tiny components")
    p.add_argument("--n-base", type=int, default=256)
    p.add_argument("--n-fast", type=int, default=2048)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--variants", default="threads:tf32:device,threads:tf32:resident",
                   help="fast runs, each POOL:CLIP_PRECISION[:RESIZE_ON[:text][:enc16]] (pool: threads or "
                        "processes; resize_on: cpu, the default, device, or resident: device resizes, images scored "
                        "on the GPU; text: the captions' CLIP text features computed once beforehand, timed apart; "
                        "enc16: the student's captions encoded by a bf16 copy of the text encoder)")
    p.add_argument("--skip", default="", help="sections to leave out: cpu_stages, extractor_precisions, breakdown")
    p.add_argument("--mode", default="reduce-overhead", help="torch.compile mode of the fast path")
    p.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN time its algorithms per shape")
    p.add_argument("--compile-extractors", action="store_true",
                   help="compile Inception and CLIP's towers (torch.compile default mode, fixed shapes)")
    p.add_argument("--budget-s", type=float, default=540, help="skip later sections past this many seconds")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "eval_fast.json"))
    args = p.parse_args()
    start = time.time()
    device = torch.device("cpu" if args.tiny else "cuda")
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    n_base, n_fast, batch, res = (8, 16, 4, 32) if args.tiny else (args.n_base, args.n_fast, args.batch, 256)
    mode = "none" if args.tiny else args.mode
    result = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "date": datetime.date.today().isoformat(), "tiny": args.tiny, "batch": batch, "resolution": res,
              "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
              "flags": {"matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
                        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
                        "cudnn_benchmark": args.cudnn_benchmark}, "compile_mode": mode,
              "compile_extractors": args.compile_extractors}

    def save(section: str) -> None:
        result["elapsed_s"] = round(time.time() - start, 1)
        if device.type == "cuda":
            result["peak_GB"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2, default=str)
        print(section, json.dumps(result.get(section), default=str), flush=True)

    ctx = build(args.tiny, device)
    result["build"] = ctx["info"]
    save("build")
    teacher, student = ctx["teacher"], ctx["student"]
    prompts = [CAPTIONS[i % len(CAPTIONS)] for i in range(n_fast)]
    z = torch.randn((n_fast, *teacher.sample_shape), generator=torch.Generator().manual_seed(0))

    # today's path: one warm-up batch, then n_base images
    today = sampler(teacher, lambda zb, c: student(zb, c), device)
    evaluate(ctx, today, z[:batch], prompts[:batch], batch, res, device)
    base = evaluate(ctx, today, z[:n_base], prompts[:n_base], batch, res, device, keep=True)
    result["today"] = {**public(base), "path": "eager fp32 weights, bf16 autocast generation, fp32 extractors, "
                                               "one thread"}
    save("today")
    if args.compile_extractors:  # after today's path, which stays eager; compiled at their first fast-path batch
        ctx["inception"].net.compile(dynamic=False)
        ctx["clip"][0].visual.compile(dynamic=False)
        ctx["clip"][0].transformer.compile(dynamic=False)

    # the fast path: compile and record on two batches, then timed runs
    t0 = time.perf_counter()
    ctx["fast_body"] = fast_generation(student, teacher, torch.bfloat16, mode=mode)
    fast = sampler(teacher, ctx["fast_body"], device)
    _, first_precision, *first_resize = args.variants.split(",")[0].split(":")
    evaluate(ctx, fast, z[:2 * batch], prompts[:2 * batch], batch, res, device, fast=True,
             clip_precision=first_precision, resize_on=(first_resize or ["cpu"])[0])
    compile_s = result["fast_compile_and_first_two_batches_s"] = round(time.perf_counter() - t0, 1)
    save("fast_compile_and_first_two_batches_s")
    with image_pool() as threads, image_pool(processes=True) as processes:
        pools = {"threads": threads, "processes": processes}
        result["pool_workers"] = threads._max_workers
        skip = set(filter(None, args.skip.split(",")))
        if "cpu_stages" not in skip:
            result["cpu_stages_ms_per_image"] = cpu_stages(ctx, base["images"], pools, batch)
            save("cpu_stages_ms_per_image")
        result["device_resize_check"] = device_resize_check(ctx, fast, z, prompts, batch, res, device)
        save("device_resize_check")
        if "breakdown" not in skip:
            result["breakdown_ms_per_image"] = breakdown(ctx, fast, z, prompts, batch, res, device)
            save("breakdown_ms_per_image")
        n_gen = min(n_fast, 16 * batch)
        for resize_on in ("cpu", "device"):
            result[f"generation_only_resize_on_{resize_on}"] = generation_only(
                fast, z[:n_gen], prompts[:n_gen], batch, res, device, threads, resize_on)
            save(f"generation_only_resize_on_{resize_on}")
        result["fast"], first, text = [], None, {}
        for variant in args.variants.split(","):
            pool_name, clip_p, *rest = variant.split(":")
            resize_on = rest[0] if rest else "cpu"
            with_text, enc16 = "text" in rest[1:], "enc16" in rest[1:]
            if enc16 and "fast_enc16" not in ctx:  # bf16 encodings recompile the UNet: two untimed batches first
                ctx["fast_enc16"] = sampler(half_text_encoders(teacher), ctx["fast_body"], device)
                t0 = time.perf_counter()
                generation_only(ctx["fast_enc16"], z[:2 * batch], prompts[:2 * batch], batch, res, device, threads,
                                "device")
                result["enc16_recompile_and_first_two_batches_s"] = round(time.perf_counter() - t0, 1)
            if with_text and clip_p not in text:  # once per protocol (kept under _reference/ by the evaluate stage)
                sync(device)
                t0 = time.perf_counter()
                text[clip_p] = scorer(ctx, clip_p).text_features(prompts, batch)
                sync(device)
                result[f"text_features_{clip_p}_s"] = round(time.perf_counter() - t0, 2)
            if first is not None and time.time() - start > args.budget_s:
                result.setdefault("skipped", []).append(f"fast run {variant}")
                continue
            run = evaluate(ctx, ctx["fast_enc16"] if enc16 else fast, z, prompts, batch, res, device,
                           clip_precision=clip_p, pool=pools[pool_name],
                           fast=True, keep=first is None, resize_on=resize_on,
                           text=text[clip_p] if with_text else None)
            run["clip_precision"], run["text_features_precomputed"] = clip_p, with_text
            run["caption_encoding"] = "bf16 weights" if enc16 else "fp32"
            if first is None:  # the Frechet distance of 2048-d statistics: a fixed cost per model, timed once
                fid_t0 = time.perf_counter()
                frechet_distance(*run["stats"], *base["stats"])
                fid_s = time.perf_counter() - fid_t0
                first = run
            rate = run["images_per_s"]
            if run is not first:  # the same images scored another way: the same statistics and cosines?
                run["stats_equal_first_run"] = bool(all(np.array_equal(x, y) for x, y in zip(run["stats"], first["stats"])))
                run["cosines_max_abs_dev_first_run"] = float((run["cosines"] - first["cosines"]).abs().max())
            result["fast"].append({**public(run), "pool": pool_name, "resize_on": resize_on,
                                   "inception_precision": "fp32",
                                   "ratio_vs_today": round(rate / base["images_per_s"], 2),
                                   "frechet_distance_s": round(fid_s, 2),
                                   "coco30k_extrapolated_s": round(N_COCO / rate + fid_s, 1),
                                   "coco30k_extrapolated_with_compile_s": round(N_COCO / rate + fid_s + compile_s, 1)})
            save("fast")
        result["agreement"] = agreement(first["images"], base["images"], batch, device)
        save("agreement")
        if "extractor_precisions" not in skip:
            result["extractor_precisions"] = deviations(ctx, first["images"], prompts, batch, device, threads, first,
                                                        start + args.budget_s)
            save("extractor_precisions")
    save("elapsed_s")


if __name__ == "__main__":
    main()
