"""The evaluate stage's fast image path on tiny models: threaded resizes and background scoring give the sequential
loop's statistics and cosines bit for bit; fixed-shape batches; extractor precisions; the fast student generator."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dmd_core.clip_score import load_clip
from dmd_core.generator import Generator
from dmd_core.inference import fast_generation
from dmd_core.evaluation import ClipScorer, ImageScores, generate_images, image_pool, pad_batch, to_protocol_images
from dmd_core.fid import EXTRACTOR_PRECISIONS, extractor_precision, features, preprocess, to_uint8
from dmd_core.tiny import TinyInception, register_tiny_clip

CAPTIONS = [f"a photo of thing {i}" for i in range(11)]


@pytest.fixture(scope="module")
def pool():
    with image_pool(4) as p:
        yield p


@pytest.fixture(scope="module")
def extractors():
    torch.manual_seed(0)
    model, preprocess_fn, tokenizer = load_clip(register_tiny_clip(), random_init=True)
    return TinyInception().eval(), ClipScorer(model, preprocess_fn, tokenizer, prefix="A photo depicts ", resize=24)


def _float_images(n: int = 11, size: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _sample(z: torch.Tensor, raw) -> torch.Tensor:
    """A per-sample deterministic 'generator': images in [0, 1] from the noise alone, any batch size."""
    return torch.sigmoid(z)


def _scores(extractors, batches, **kwargs) -> tuple[tuple[np.ndarray, np.ndarray], torch.Tensor]:
    inception, clip = extractors
    scores = ImageScores(inception, "clean", "cpu", clip, **kwargs)
    for images, captions in batches:
        scores.update(images, captions)
    return scores.stats.compute(), torch.cat(scores.cosines)


def test_threaded_background_scoring_equals_the_sequential_loop_bit_for_bit(extractors, pool):
    z = torch.randn(11, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    sequential = list(generate_images(_sample, z, CAPTIONS, 3, 32))
    threaded = list(generate_images(_sample, z, CAPTIONS, 3, 32, pool=pool, fixed_batch=True))
    assert [c for _, c in threaded] == [c for _, c in sequential]
    for (a, _), (b, _) in zip(sequential, threaded):
        assert np.array_equal(a, b)
    (mu, sigma), cos = _scores(extractors, sequential)
    (mu_t, sigma_t), cos_t = _scores(extractors, threaded, pool=pool, background=True, warmup_batches=1)
    assert np.array_equal(mu, mu_t) and np.array_equal(sigma, sigma_t)
    assert torch.equal(cos, cos_t) and cos.shape == (11,)


def test_pooled_resizes_equal_the_loop(extractors, pool):
    images = _float_images()
    arr = to_protocol_images(images, 24)
    assert np.array_equal(arr, to_protocol_images(images, 24, pool))
    assert torch.equal(preprocess(list(arr)), preprocess(list(arr), pool=pool))
    inception, clip = extractors
    assert np.array_equal(features(arr, inception, "clean"), features(arr, inception, "clean", pool=pool))
    assert torch.equal(clip(arr, CAPTIONS), clip(arr, CAPTIONS, pool))


def test_to_uint8_quantises_as_before():
    x = torch.tensor([-0.5, 0.0, 0.5 / 255, 1.5 / 255, 0.5, 1.0, 2.0]).reshape(1, 1, 1, 7)
    assert to_uint8(x).flatten().tolist() == [0, 0, 0, 2, 128, 255, 255]  # clamp, x255, round half to even


def test_fixed_batch_pads_the_last_batch_and_drops_the_padding():
    seen = []

    def sample(z, raw):
        seen.append((z.shape[0], list(raw)))
        return _sample(z, raw)

    z = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    out = list(generate_images(sample, z, CAPTIONS[:5], 2, 8, fixed_batch=True))
    assert [s for s, _ in seen] == [2, 2, 2] and seen[-1][1] == [CAPTIONS[4]] * 2
    assert [a.shape[0] for a, _ in out] == [2, 2, 1] and out[-1][1] == [CAPTIONS[4]]
    assert np.array_equal(np.concatenate([a for a, _ in out]), to_protocol_images(_sample(z, None), 8))


def test_pad_batch_keeps_conditions_aligned():
    z = torch.arange(2.0).reshape(2, 1)
    zp, labels = pad_batch(z, torch.tensor([7, 3]), 4)
    assert zp.flatten().tolist() == [0, 1, 0, 0] and labels.tolist() == [7, 3, 7, 7]
    assert pad_batch(z, None, 3)[1] is None and pad_batch(z, ["a", "b"], 2)[1] == ["a", "b"]


def test_extractor_precisions(extractors):
    inception, clip = extractors
    arr = to_protocol_images(_float_images(), 24)
    with pytest.raises(ValueError, match="extractor precision"):
        features(arr, inception, "clean", precision="fp8")
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with extractor_precision("tf32", "cpu"):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == flags
    ref = features(arr, inception, "clean")
    for precision in EXTRACTOR_PRECISIONS:
        feats = features(arr, inception, "clean", precision=precision)
        assert feats.dtype == np.float32 and np.allclose(feats, ref, rtol=0.05, atol=0.05)
    bf16 = ClipScorer(clip.model, clip.preprocess, clip.tokenizer, clip.prefix, clip.resize, precision="bf16")
    assert torch.allclose(bf16(arr, CAPTIONS), clip(arr, CAPTIONS), atol=0.05)


def test_background_errors_are_raised_not_swallowed(extractors):
    inception, _ = extractors
    scores = ImageScores(inception, "clean", "cpu", background=True, warmup_batches=0)
    scores.update(np.zeros((2, 8, 8, 3), np.uint8))
    scores.update(np.zeros((2, 8, 8), np.float32))  # not uint8 images: fails in the worker
    with pytest.raises(TypeError, match="uint8"):
        scores.stats


def test_fast_generation_matches_the_autocast_path_on_cpu():
    """Eager (mode none) on the CPU: bf16 weights under bf16 autocast give the autocast path's images."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from sd15_train_step import build_teacher  # the tiny SD teacher of the benchmarks

    teacher = build_teacher(True, "cpu")
    student = Generator(teacher.student(teacher.denoiser.state_dict()), teacher.process, (999,))
    z = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(3))
    cond = teacher.encode(CAPTIONS[:2])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = teacher.decode(student(z, cond)).float()
    fast = fast_generation(student, teacher, torch.bfloat16, mode="none")
    with torch.no_grad():
        x0 = fast(z, cond)
        images = teacher.decode(x0)  # outside autocast: the decoder casts its float32 input
    assert x0.dtype == torch.float32 and images.dtype == torch.bfloat16
    assert next(teacher.vae.parameters()).dtype == torch.bfloat16
    assert (images.float() - ref).abs().max() < 0.1
    with pytest.raises(TypeError, match="Generator over a NetDenoiser"):
        fast_generation(torch.nn.Linear(2, 2))


def test_process_pool_gives_the_same_bytes(extractors):
    inception, clip = extractors
    arr = to_protocol_images(_float_images(n=4), 24)
    with image_pool(2, processes=True) as processes:
        assert np.array_equal(to_protocol_images(_float_images(n=4), 24, processes), arr)
        assert torch.equal(preprocess(list(arr), pool=processes), preprocess(list(arr)))
        assert torch.equal(clip(arr, CAPTIONS[:4], processes), clip(arr, CAPTIONS[:4]))


def test_device_resizes_equal_the_pil_path(extractors):
    """resize_on="device" (run here on CPU tensors): the protocol's crop + Lanczos, clean-fid's float bicubic to
    299 and CLIP's preprocess give PIL's bytes and values, so the features and cosines are the same bit for bit."""
    inception, clip = extractors
    images = torch.rand(5, 3, 40, 52, generator=torch.Generator().manual_seed(4))
    arr = to_protocol_images(images, 24)
    assert np.array_equal(to_protocol_images(images, 24, resize_on="device"), arr)
    assert torch.equal(preprocess(list(arr), resize_on="device"), preprocess(list(arr)))
    mixed = [arr[0], arr[1, :20, :22], arr[2]]  # images of two sizes in one batch
    assert torch.equal(preprocess(mixed, resize_on="device"), preprocess(mixed))
    assert np.array_equal(features(arr, inception, "clean", resize_on="device"), features(arr, inception, "clean"))
    on_device = ClipScorer(clip.model, clip.preprocess, clip.tokenizer, clip.prefix, clip.resize, resize_on="device")
    assert torch.equal(on_device(arr, CAPTIONS[:5]), clip(arr, CAPTIONS[:5]))
    (mu, sigma), cos = _scores(extractors, [(arr, CAPTIONS[:5])])
    scores = ImageScores(inception, "clean", "cpu", on_device, resize_on="device")
    scores.update(arr, CAPTIONS[:5])
    assert np.array_equal(scores.stats.compute()[0], mu) and np.array_equal(scores.stats.compute()[1], sigma)
    assert torch.equal(torch.cat(scores.cosines), cos)
    z = torch.randn(5, 3, 40, 40, generator=torch.Generator().manual_seed(5))
    for (a, _), (b, _) in zip(generate_images(_sample, z, CAPTIONS, 2, 24),
                              generate_images(_sample, z, CAPTIONS, 2, 24, resize_on="device")):
        assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="resize_on"):
        to_protocol_images(images, 24, resize_on="gpu")


def test_text_features_computed_once_give_the_same_cosines_without_the_text_tower(extractors, pool):
    """ClipScorer.with_text: the captions' embeddings computed beforehand in the scoring batches, then every batch
    (numpy and device-resident paths) skips the text tower and gets the same cosines bit for bit."""
    inception, clip = extractors
    z = torch.randn(11, 3, 40, 40, generator=torch.Generator().manual_seed(8))
    batches = list(generate_images(_sample, z, CAPTIONS, 3, 24))
    _, cos = _scores(extractors, batches)
    text = clip.text_features(CAPTIONS, batch_size=3)
    assert text.shape == (11, clip.model.text_projection.shape[1])
    assert torch.allclose(text.norm(dim=-1), torch.ones(11), atol=1e-6)
    cached = clip.with_text(CAPTIONS, text)
    calls = []
    hook = cached.model.transformer.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        _, cos_cached = _scores((inception, cached), batches, pool=pool)
        on_device = ClipScorer(clip.model, clip.preprocess, clip.tokenizer, clip.prefix, clip.resize,
                               resize_on="device", text=cached.text)
        _, cos_device = _scores((inception, on_device), [(torch.from_numpy(a), c) for a, c in batches],
                                resize_on="device")
        assert calls == []
        cached(batches[0][0], ["a caption not computed"] * 3)  # an unknown caption: the tower runs
        assert calls
    finally:
        hook.remove()
    assert torch.equal(cos_cached, cos) and torch.equal(cos_device, cos)
    with pytest.raises(ValueError, match="11 captions but 10 text features"):
        clip.with_text(CAPTIONS, text[:10])


def test_images_left_on_their_device_score_as_the_sequential_loop(extractors):
    """generate_images(on_device=True) hands uint8 (B, R, R, 3) tensors to ImageScores, which scores them where
    they are and adds batch i to the statistics after batch i + 1 is queued: the same statistics and cosines bit
    for bit as the numpy path, in batch order (run here on CPU tensors)."""
    inception, clip = extractors
    on_device = ClipScorer(clip.model, clip.preprocess, clip.tokenizer, clip.prefix, clip.resize, resize_on="device")
    z = torch.randn(11, 3, 40, 40, generator=torch.Generator().manual_seed(6))
    kept = list(generate_images(_sample, z, CAPTIONS, 3, 24, resize_on="device", on_device=True))
    assert all(isinstance(b, torch.Tensor) and b.dtype == torch.uint8 and b.shape[1:] == (24, 24, 3) for b, _ in kept)
    plain = list(generate_images(_sample, z, CAPTIONS, 3, 24))
    assert all(np.array_equal(a, b.numpy()) for (a, _), (b, _) in zip(plain, kept))
    (mu, sigma), cos = _scores(extractors, plain)
    scores = ImageScores(inception, "clean", "cpu", on_device, resize_on="device")
    for i, (images, captions) in enumerate(kept):
        scores.update(images, captions)
        assert len(scores._queued) == 1 and scores._stats.n == 3 * i  # one batch held back, the rest added
    (mu_d, sigma_d), cos_d = scores.stats.compute(), torch.cat(scores.cosines)
    assert np.array_equal(mu, mu_d) and np.array_equal(sigma, sigma_d) and torch.equal(cos, cos_d)
    with pytest.raises(ValueError, match="resize_on='device'"):
        ImageScores(inception, "clean", "cpu", clip).update(kept[0][0], kept[0][1])
    with pytest.raises(ValueError, match="on_device"):
        next(generate_images(_sample, z, CAPTIONS, 3, 24, on_device=True))


def test_device_preprocess_of_vit_g_14_equals_open_clip():
    """ViT-g-14's own preprocess (Resize 224 bicubic, CenterCrop, ToTensor, Normalize) after DMD2's 256 step."""
    import open_clip

    from dmd_core.clip_score import _portable, device_preprocess, pil_stages, split_preprocess

    cfg = open_clip.get_pretrained_cfg("ViT-g-14", "laion2b_s12b_b42k")
    pre = open_clip.image_transform(224, False, mean=cfg["mean"], std=cfg["std"],
                                    interpolation=cfg["interpolation"], resize_mode=cfg["resize_mode"])
    x = torch.randint(0, 256, (3, 3, 300, 260), dtype=torch.uint8, generator=torch.Generator().manual_seed(6))
    pil_part, tensor_part = split_preprocess(pre)
    ref = torch.stack([tensor_part(pil_stages(_portable(x[i]), pil_part, 256)) for i in range(3)])
    assert torch.equal(device_preprocess(x, pre, 256), ref)
