"""Batched Kaldi fbank vs torchaudio, and the `audio_patches` / `audio_frames` tokenizers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchaudio.compliance.kaldi as kaldi
from oracles import resize_matrix

from tokenizers_mm.audio import AudioFrames, AudioPatches, fbank, fbank_with_lengths, num_fbank_frames
from tokenizers_mm.registry import create_tokenizer
from tokenizers_mm.tokens import Tokens

SR = 16000
AST_KW = dict(htk_compat=True, use_energy=False, window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10)


def _batch(n: int = 3, samples: int = 8000, seed: int = 0) -> torch.Tensor:
    """Two seeded noise rows plus a 440 Hz sine (and more noise rows if n > 3)."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randn(samples, generator=g) * 0.1 for _ in range(n - 1)]
    t = torch.arange(samples) / SR
    rows.insert(1, 0.5 * torch.sin(2 * math.pi * 440.0 * t))
    return torch.stack(rows)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        AST_KW,
        dict(use_energy=True, htk_compat=True),
        dict(use_energy=True, htk_compat=False),
        dict(use_energy=True, raw_energy=False, energy_floor=0.0),
        dict(snip_edges=False),
        dict(subtract_mean=True),
        dict(window_type="hamming"),
        dict(window_type="povey"),
        dict(window_type="rectangular"),
        dict(window_type="blackman"),
        dict(sample_frequency=8000.0, num_mel_bins=40),
        dict(round_to_power_of_two=False, frame_length=20.0),
        dict(use_log_fbank=False, use_power=False),
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default",
)
def test_fbank_matches_torchaudio(kwargs):
    wav = _batch()
    ours = fbank(wav, **kwargs)
    ref = torch.stack([kaldi.fbank(wav[i : i + 1], **kwargs) for i in range(wav.shape[0])])
    assert ours.shape == ref.shape
    tol = 1e-4 * max(1.0, ref.abs().max().item()) if not kwargs.get("use_log_fbank", True) else 1e-4
    assert (ours - ref).abs().max().item() <= tol


def test_fbank_1d_and_sample_rate_positional():
    wav = _batch(1)[0]
    ours = fbank(wav, 8000, num_mel_bins=30)
    ref = kaldi.fbank(wav.unsqueeze(0), sample_frequency=8000, num_mel_bins=30)
    assert ours.shape == (1, *ref.shape)
    assert torch.allclose(ours[0], ref, atol=1e-4)


@pytest.mark.parametrize("snip_edges", [True, False])
@pytest.mark.parametrize("subtract_mean", [False, True])
def test_fbank_variable_lengths(snip_edges, subtract_mean):
    wav = _batch(3, 9000, seed=1)
    lengths = torch.tensor([9000, 5123, 800])
    wav[1, 5123:] = 7.0  # garbage in the padding must not leak into valid frames
    kw = dict(snip_edges=snip_edges, subtract_mean=subtract_mean, num_mel_bins=40)
    feats, n = fbank_with_lengths(wav, SR, lengths, **kw)
    assert n.tolist() == [num_fbank_frames(int(L), SR, snip_edges=snip_edges) for L in lengths]
    assert feats.shape[1] == int(n.max())
    for i, L in enumerate(lengths.tolist()):
        ref = kaldi.fbank(wav[i : i + 1, :L], **kw)
        assert ref.shape[0] == n[i]
        assert (feats[i, : n[i]] - ref).abs().max().item() <= 1e-4
        assert feats[i, n[i] :].abs().max().item() == 0.0 if n[i] < feats.shape[1] else True


@pytest.mark.parametrize("with_lengths", [False, True])
def test_fbank_cpu_chunks_match_torchaudio(monkeypatch, with_lengths):
    """The CPU path splits a big batch into row chunks (`_CPU_CHUNK_ELEMS`): shrink the budget so a 5-row batch runs
    as chunks of 2, 2 and 1 rows, and check every row against torchaudio."""
    import tokenizers_mm.audio as audio_mod

    wav = _batch(5, 8000, seed=2)
    lengths = torch.tensor([8000, 6100, 7777, 400, 5003])
    kw = dict(snip_edges=False, subtract_mean=True, num_mel_bins=40)
    m = num_fbank_frames(8000, SR, snip_edges=False)  # frames of the padded batch; 400-sample frames FFT at 512
    monkeypatch.setattr(audio_mod, "_CPU_CHUNK_ELEMS", 2 * m * 512 + 7)  # room for 2 rows, not 3
    chunks = []
    real_impl = audio_mod._fbank_impl

    def spy(x, *args):
        chunks.append(x.shape[0])
        return real_impl(x, *args)

    monkeypatch.setattr(audio_mod, "_fbank_impl", spy)
    feats, n = fbank_with_lengths(wav, SR, lengths if with_lengths else None, **kw)
    assert chunks == [2, 2, 1]
    assert feats.shape == (5, m, 40)
    for i, L in enumerate(lengths.tolist() if with_lengths else [8000] * 5):
        ref = kaldi.fbank(wav[i : i + 1, :L], **kw)
        assert n[i] == ref.shape[0]
        assert (feats[i, : n[i]] - ref).abs().max().item() <= 1e-4, f"row {i}"
        assert n[i] == m or feats[i, n[i] :].abs().max().item() == 0.0


def test_fbank_dither_uses_generator():
    wav = _batch()
    a = fbank(wav, dither=1.0, generator=torch.Generator().manual_seed(3))
    b = fbank(wav, dither=1.0, generator=torch.Generator().manual_seed(3))
    c = fbank(wav, dither=1.0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_fbank_bad_inputs():
    with pytest.raises(ValueError, match="too short"):
        fbank(torch.zeros(1))
    with pytest.raises(ValueError, match="too short"):
        fbank(torch.zeros(2, 399))
    with pytest.raises(TypeError, match="floating-point"):
        fbank(torch.zeros(2, 16000, dtype=torch.int16))
    with pytest.raises(ValueError, match=r"\[B, S\]"):
        fbank(torch.zeros(2, 1, 16000))
    with pytest.raises(ValueError, match="too short"):
        fbank_with_lengths(torch.zeros(2, 16000), SR, torch.tensor([16000, 100]))
    with pytest.raises(ValueError, match="lengths"):
        fbank_with_lengths(torch.zeros(2, 16000), SR, torch.tensor([16001, 16000]))
    with pytest.raises(ValueError, match="window_type"):
        fbank(torch.zeros(1, 16000), window_type="kaiser")


# ---------------------------------------------------------------- audio_patches (AST)


def test_ast_grid_and_token_count():
    tok = AudioPatches(embed_dim=16)
    assert tok.patch_grid(1024) == (12, 101)
    assert tok.num_tokens() == 1 + 12 * 101
    assert AudioPatches(embed_dim=16, dist_token=True).num_tokens() == 2 + 1212
    assert AudioPatches(embed_dim=16, class_token=False).num_tokens() == 1212


def test_ast_ten_seconds_padded_to_1024():
    torch.manual_seed(0)
    tok = AudioPatches(embed_dim=16, dist_token=True)
    wav = _batch(2, 10 * SR)
    feats, n = tok.compute_fbank(wav)
    assert feats.shape == (2, 998, 128) and n.tolist() == [998, 998]
    out = tok(wav)
    assert isinstance(out, Tokens) and out.modality == "audio"
    assert out.x.shape == (2, 2 + 1212, 16) and out.grid == (12, 101) and out.num_prefix == 2
    assert out.pos.shape == (2, 1214, 2) and out.pos[0, 0].tolist() == [-1.0, -1.0]
    grid_pos = out.pos[0, 2:].view(12, 101, 2)
    assert grid_pos[3, 7].tolist() == [3.0, 7.0]
    # columns 0..99 start before frame 998; column 100 covers frames 1000..1015 (all padding)
    m = out.mask[:, 2:].view(2, 12, 101)
    assert out.mask[:, :2].all() and m[..., :100].all() and not m[..., 100].any()


def test_ast_matches_manual_pipeline_and_precomputed_fbank():
    torch.manual_seed(0)
    tok = AudioPatches(embed_dim=8, class_token=False, pos_embed="none", target_frames=128)
    wav = _batch(2, 16000)
    ref_fb = torch.stack([kaldi.fbank(w[None] - w.mean(), sample_frequency=SR, **AST_KW) for w in wav])  # 98 frames
    ref_fb = torch.nn.functional.pad(ref_fb, (0, 0, 0, 30))
    ref_fb = (ref_fb - tok.norm_mean) / (2 * tok.norm_std)
    ref = tok.proj(ref_fb.transpose(1, 2).unsqueeze(1)).flatten(2).transpose(1, 2)
    assert torch.allclose(tok(wav).x, ref, atol=1e-4)
    raw = torch.stack([kaldi.fbank(w[None], sample_frequency=SR, **AST_KW) for w in wav])
    assert torch.allclose(tok(raw).x, ref, atol=1e-4)


def test_ast_lengths_mask_and_gradients():
    torch.manual_seed(0)
    tok = create_tokenizer("audio_patches", embed_dim=8, target_frames=256)
    assert tok.patch_grid() == (12, 25)
    wav = _batch(2, 3 * SR)
    out = tok(wav, lengths=torch.tensor([3 * SR, SR]))  # 298 frames (cut to 256) and 98 frames
    m = out.mask[:, 1:].view(2, 12, 25)
    assert m[0].all()
    assert m[1, :, :10].all() and not m[1, :, 10:].any()  # column 9 starts at frame 90 < 98, column 10 at 100
    out.x.sum().backward()
    assert isinstance(tok.proj, torch.nn.Conv2d) and tok.proj.weight.grad.abs().sum() > 0
    assert tok.pos_embed.grad is not None and tok.cls_token.grad is not None


def test_ast_position_interpolation():
    torch.manual_seed(0)
    tok = AudioPatches(embed_dim=8, target_frames=256)  # positions built for grid (12, 25)
    with torch.no_grad():  # well away from the 0.02 init, so a wrong resampling shows
        tok.pos_embed.copy_(torch.randn(tok.pos_embed.shape, generator=torch.Generator().manual_seed(1)))
    wav = torch.randn(1, 2 * SR, generator=torch.Generator().manual_seed(2)) * 0.1
    with torch.no_grad():
        out = tok(wav, target_frames=512)
    assert out.grid == (12, 50) and out.x.shape == (1, 1 + 600, 8)
    # reference: Kaldi fbank (torchaudio) of the mean-removed wave, zero-padded to 512 frames, AST-normalised,
    # 16x16 patches at stride 10 dotted with the conv kernel + bias, plus the (12, 25) table resampled to (12, 50)
    fb = kaldi.fbank(wav - wav.mean(), sample_frequency=SR, **AST_KW).double().numpy()
    assert fb.shape == (198, 128)
    spec = np.zeros((128, 512))
    spec[:, : fb.shape[0]] = fb.T
    spec = (spec - tok.norm_mean) / (2 * tok.norm_std)
    patches = np.lib.stride_tricks.sliding_window_view(spec, (16, 16))[::10, ::10]  # [12, 50, 16, 16]
    w = tok.proj.weight.detach().double().numpy().reshape(8, -1)
    conv = patches.reshape(600, 256) @ w.T + tok.proj.bias.detach().double().numpy()
    table = tok.pos_embed.detach().double().numpy()[0]
    grid_pos = np.einsum("af,bt,ftd->abd", resize_matrix(12, 12), resize_matrix(25, 50), table[1:].reshape(12, 25, 8))
    ref = np.concatenate([tok.cls_token.detach().double().numpy()[0] + table[:1], conv + grid_pos.reshape(600, 8)])
    np.testing.assert_allclose(out.x[0].double().numpy(), ref, atol=1e-4, rtol=0)
    # 198 real frames: columns 0..19 start inside them, 20.. are padding
    assert out.mask[0, 1:].view(12, 50)[:, :20].all() and not out.mask[0, 1:].view(12, 50)[:, 20:].any()


def test_ast_sample_rate_handling():
    tok = AudioPatches(embed_dim=8, target_frames=128)
    wav8k = torch.randn(2, 8000) * 0.1
    with pytest.raises(ValueError, match="16000 Hz"):
        tok(wav8k, sample_rate=8000)
    rs = AudioPatches(embed_dim=8, target_frames=128, resample=True)
    out = rs(wav8k, lengths=torch.tensor([8000, 4000]), sample_rate=8000)  # -> 16000 / 8000 samples: 98 / 48 frames
    m = out.mask[:, 1:].view(2, 12, 12)
    assert m[0, :, :10].all() and not m[0, :, 10:].any()
    assert m[1, :, :5].all() and not m[1, :, 5:].any()
    with pytest.raises(ValueError, match="fbank"):
        tok(torch.randn(2, 100, 80))
    with pytest.raises(TypeError):
        tok(torch.zeros(2, 16000, dtype=torch.int32))
    with pytest.raises(ValueError, match="too short"):
        tok(torch.zeros(1, 1))


# ---------------------------------------------------------------- audio_frames


def test_audio_frames_counts_dims_and_positions():
    wav = _batch(2, 16000)  # 98 frames -> 24 tokens of 4 frames
    tok = AudioFrames()
    out = tok(wav)
    assert out.x.shape == (2, 24, 4 * 80) and out.grid == (24,) and out.modality == "audio"
    feats = fbank(wav, num_mel_bins=80)
    assert torch.equal(out.x[:, 1], feats[:, 4:8].reshape(2, 320))
    assert out.pos.shape == (2, 24, 1) and torch.allclose(out.pos[0, :3, 0], torch.tensor([0.0, 0.04, 0.08]))
    assert out.mask.all()
    proj = create_tokenizer("audio_frames", stack=5, embed_dim=32)
    out = proj(wav)
    assert out.x.shape == (2, 19, 32)
    out.x.sum().backward()
    assert proj.proj.weight.grad is not None


def test_audio_frames_mask_from_lengths():
    tok = AudioFrames(num_mel_bins=40, stack=4)
    wav = _batch(2, 16000)
    out = tok(wav, lengths=torch.tensor([16000, 4000]))  # 98 and 23 frames
    assert out.mask[0].all()
    assert out.mask[1, :6].all() and not out.mask[1, 6:].any()  # token 5 starts at frame 20 < 23, token 6 at 24
    fb, n = fbank_with_lengths(wav, SR, torch.tensor([16000, 4000]), num_mel_bins=40)
    out2 = tok(fb, lengths=n)
    assert torch.equal(out2.mask, out.mask) and torch.equal(out2.x, out.x)


def test_audio_frames_bad_inputs():
    tok = AudioFrames()
    with pytest.raises(ValueError, match="16000 Hz"):
        tok(torch.randn(1, 8000), sample_rate=8000)
    with pytest.raises(ValueError, match="too short"):
        tok(torch.randn(1, 600))  # 3 frames < stack 4
    with pytest.raises(ValueError, match="fbank"):
        tok(torch.randn(1, 10, 23))
