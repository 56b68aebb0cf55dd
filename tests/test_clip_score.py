"""CLIP score on a tiny random open_clip model built offline: hand computation, DMD2 prefix, local weights."""
from __future__ import annotations

import json
import socket

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

open_clip = pytest.importorskip("open_clip")

from dmd_core.clip_score import (DMD2_PREFIX, DMD2_RESIZE, center_crop_resize, clip_score, load_clip,  # noqa: E402
                                 to_pil, tokenize_captions)

TINY = "dmd-tiny-clip-test"
TINY_CFG = {  # ViT: width 64, 2 layers, patch 8, 32 px; text: width 64, 2 layers, context 77; embed 32
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
CAPTIONS = ["a cat on a mat", "Two dogs running on the beach.", "a red bus", "an empty street at night"]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any download or socket connection fails the test; returns the list of attempts."""
    attempts = []

    def refuse(name):
        def _refuse(*args, **kwargs):
            attempts.append(name)
            raise AssertionError(f"network access attempted: {name}")
        return _refuse

    for mod in (open_clip.pretrained, open_clip.factory):
        for fn in ("download_pretrained", "download_pretrained_from_hf", "download_pretrained_from_url"):
            if hasattr(mod, fn):
                monkeypatch.setattr(mod, fn, refuse(fn))
    monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", refuse("hf_hub_download"), raising=False)
    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(socket, "create_connection", refuse("socket.create_connection"))
    return attempts


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A registered tiny ViT CLIP config (open_clip's supported way: add_model_config) and a random model."""
    path = tmp_path_factory.mktemp("clipcfg") / f"{TINY}.json"
    path.write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    model, preprocess, tokenizer = load_clip(TINY, random_init=True)
    yield model, preprocess, tokenizer
    open_clip.factory._MODEL_CONFIG_PATHS.remove(path)
    open_clip.factory._MODEL_CONFIGS.pop(TINY, None)


def _images(n=4, h=40, w=48, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _hand(model, preprocess, tokens, pils):
    img = model.encode_image(torch.stack([preprocess(p) for p in pils]))
    txt = model.encode_text(tokens)
    img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
    return (img * txt).sum(-1)


def _dmd2_tokens(tokenizer, captions):
    """DMD2 coco_evaluator.compute_clip_score's splice, with open_clip's BPE tokenizer (same vocab as clip.tokenize)."""
    tokens = tokenizer(captions)
    prefix = tokenizer(["A photo depicts "])[:, 1:4].expand(tokens.shape[0], -1)
    new = torch.cat([tokens[:, :1], prefix, tokens[:, 1:]], dim=1)[:, :77]
    last = new[:, 76:77].clone()
    last[last > 0] = 49407
    return torch.cat([new[:, :76], last], dim=1)


@torch.no_grad()
def test_clip_score_matches_hand_computation(tiny):
    model, preprocess, tokenizer = tiny
    x = _images()
    mean, per = clip_score(x, CAPTIONS, model, preprocess, tokenizer, batch_size=3)
    pils = [Image.fromarray((xi * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()) for xi in x]
    ref = _hand(model, preprocess, tokenizer(CAPTIONS), pils)
    assert per.shape == (4,)
    torch.testing.assert_close(per, ref, atol=1e-6, rtol=0)
    assert mean == pytest.approx(ref.double().mean().item(), abs=1e-6)
    # PIL, uint8 and list-of-tensor inputs give the same values as float tensors in [0, 1].
    u8 = (x * 255).round().to(torch.uint8)
    for other in (pils, u8, list(x)):
        torch.testing.assert_close(clip_score(other, CAPTIONS, model, preprocess, tokenizer)[1], per, atol=1e-6, rtol=0)


@torch.no_grad()
def test_dmd2_resize_step(tiny):
    model, preprocess, tokenizer = tiny
    x = _images(h=40, w=56, seed=1)
    _, per = clip_score(x, CAPTIONS, model, preprocess, tokenizer, resize=DMD2_RESIZE)
    pils = []
    for xi in x:
        p = to_pil(xi)
        p = p.crop((8, 0, 48, 40)).resize((256, 256), Image.LANCZOS)  # center 40x40 of 56x40
        pils.append(p)
    assert center_crop_resize(to_pil(x[0]), 256).tobytes() == pils[0].tobytes()
    torch.testing.assert_close(per, _hand(model, preprocess, tokenizer(CAPTIONS), pils), atol=1e-6, rtol=0)


def test_prefix_goes_right_after_start_token(tiny):
    _, _, tokenizer = tiny
    long_caption = "a dog and a cat " * 20  # 100 BPE tokens: exercises truncation at 77
    captions = CAPTIONS + [long_caption, ""]
    plain = tokenize_captions(captions, tokenizer)
    pre = tokenize_captions(captions, tokenizer, DMD2_PREFIX)
    prefix_ids = tokenizer(["A photo depicts"])[0, 1:4]
    assert tokenizer.decode(prefix_ids.tolist()).strip() == "a photo depicts"
    sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id
    assert (pre[:, 0] == sot).all() and (pre[:, 1:4] == prefix_ids).all()
    for i, c in enumerate(captions[:4]):
        n = int((plain[i] != 0).sum())
        assert torch.equal(pre[i, 4:n + 3], plain[i, 1:n]) and (pre[i, n + 3:] == 0).all()
    assert pre[4, 76] == eot and torch.equal(pre[4, 4:76], plain[4, 1:73])
    # Identical to DMD2's token splice, long and empty captions included.
    assert torch.equal(pre, _dmd2_tokens(tokenizer, captions))


@torch.no_grad()
def test_prefix_in_clip_score(tiny):
    model, preprocess, tokenizer = tiny
    x = _images(seed=2)
    _, per = clip_score(x, CAPTIONS, model, preprocess, tokenizer, prefix=DMD2_PREFIX)
    ref = _hand(model, preprocess, _dmd2_tokens(tokenizer, CAPTIONS), [to_pil(xi) for xi in x])
    torch.testing.assert_close(per, ref, atol=1e-6, rtol=0)
    _, plain = clip_score(x, CAPTIONS, model, preprocess, tokenizer)
    assert not torch.allclose(per, plain)


@torch.no_grad()
def test_local_weights_load_offline(tiny, tmp_path, monkeypatch, no_network):
    from safetensors.torch import save_file

    model, preprocess, tokenizer = tiny
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "open_clip_model.safetensors"))
    torch.save(state, tmp_path / "open_clip_pytorch_model.bin")
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k.get("weights_only")) or real_load(*a, **k))
    x = _images(seed=3)
    _, ref = clip_score(x, CAPTIONS, model, preprocess, tokenizer)
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        loaded, pp, tok = load_clip(TINY, weights=str(tmp_path / name))
        for k, v in loaded.state_dict().items():
            assert torch.equal(v, state[k]), k
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
        torch.testing.assert_close(clip_score(x, CAPTIONS, loaded, pp, tok)[1], ref, atol=1e-6, rtol=0)
    assert loads == [True]  # safetensors needs no torch.load; the .bin is unpickled with weights_only=True
    assert no_network == []


def test_missing_weights_one_line_no_download(tmp_path, no_network):
    (tmp_path / "folder").mkdir()
    for weights in (None, str(tmp_path / "nope.safetensors"), "laion2b_s12b_b42k", str(tmp_path / "folder")):
        with pytest.raises(FileNotFoundError) as err:
            load_clip("ViT-g-14", weights=weights)
        msg = str(err.value)
        assert "\n" not in msg and "evaluate.clip_weights" in msg and "open_clip_pytorch_model.bin" in msg
        if weights:
            assert weights in msg
    assert no_network == []


def test_file_path_gets_the_tags_preprocessing():
    """A local file gets open_clip's default preprocessing; for laion2b_s12b_b42k that is the tag's own."""
    from open_clip.transform import PreprocessCfg

    tag = open_clip.get_pretrained_cfg("ViT-g-14", "laion2b_s12b_b42k")
    default = PreprocessCfg()
    assert tuple(tag["mean"]) == default.mean and tuple(tag["std"]) == default.std
    assert tag["interpolation"] == default.interpolation == "bicubic"
    assert tag["resize_mode"] == default.resize_mode == "shortest" and not tag.get("quick_gelu", False)


def test_input_validation(tiny):
    model, preprocess, tokenizer = tiny
    with pytest.raises(ValueError, match="2 captions"):
        clip_score(_images(), CAPTIONS[:2], model, preprocess, tokenizer)
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        to_pil(torch.rand(1, 8, 8))
    with pytest.raises(TypeError):
        tokenize_captions("a cat", tokenizer)
