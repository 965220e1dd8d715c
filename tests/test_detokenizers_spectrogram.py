"""`waveform` detokenizer: the fbank it reconstructs is exactly the AST tokenizer's input, its patches are the
tokenizer's patches in the tokenizer's order, and padding is never scored."""

from __future__ import annotations

import pytest
import torch

from tokenizers_mm import create_detokenizer
from tokenizers_mm.audio import AudioPatches


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    tok = AudioPatches(embed_dim=16, num_mel_bins=64, target_frames=48, fstride=16, tstride=16, pos_embed="none")
    dec = create_detokenizer(
        "waveform", in_dim=16, num_mel_bins=64, target_frames=48, decoder_dim=16, depth=1, num_heads=2, n_iter=4
    )
    return tok, dec


def test_features_and_patches_are_the_tokenizers(pair):
    tok, dec = pair
    t = torch.arange(9000) / 16000
    wav = torch.stack([torch.sin(2 * torch.pi * 440 * t), torch.sin(2 * torch.pi * 1300 * t) * 0.3])
    lengths = torch.tensor([9000, 5000])
    feats, frames = dec.features(wav, lengths)
    raw, raw_frames = tok.compute_fbank(wav, lengths)
    expected = torch.nn.functional.pad(raw, (0, 0, 0, 48 - raw.shape[1]))[:, :48]
    torch.testing.assert_close(feats, (expected - tok.norm_mean) / (2 * tok.norm_std))
    assert torch.equal(frames, raw_frames.clamp_max(48))
    tokens = tok(wav, lengths=lengths)
    assert torch.equal(dec.real_patches(frames), tokens.mask[:, tok.num_prefix_tokens :])
    # the tokenizer's conv over the fbank equals a linear map of our patches: the same patch order and layout
    with torch.no_grad():
        w = tok.proj.weight.reshape(16, -1)  # [D, 1*p*p] in (row = mel, col = frame) order
        ours = dec.target(feats) @ w.T + tok.proj.bias
    torch.testing.assert_close(ours, tokens.x[:, tok.num_prefix_tokens :], atol=1e-5, rtol=1e-5)


def test_spectrogram_round_trip_and_padding_is_not_scored(pair):
    _, dec = pair
    feats = torch.randn(2, 48, 64)
    patches = dec.target(feats)
    assert torch.equal(dec.spectrogram(patches), feats)
    hidden = torch.zeros(2, 12)
    hidden[:, 5:] = 1
    frames = torch.tensor([48, 20])  # clip 1: columns 0 and 1 real (frames 0..19), the rest padding
    pred = patches.clone()
    pred[1, 4:] += 10.0
    noisy = pred.clone()
    cols = torch.arange(12) % 3
    pred[1] = torch.where((cols >= 2)[:, None], pred[1], patches[1])  # wrong only in column 2: clip 1's padding
    assert dec.loss(feats, pred, hidden, frames).item() == 0.0
    assert dec.loss(feats, noisy, hidden, None).item() > 0.0
    with pytest.raises(ValueError, match="needs feats="):
        dec.spectrogram(patches, hidden=hidden)


def test_to_waveform_cuts_each_clip_to_its_frames(pair):
    _, dec = pair
    feats, frames = dec.features(torch.randn(2, 8000) * 0.1, torch.tensor([8000, 4000]))
    waves = dec.to_waveform(feats, frames)
    assert waves[0].shape[-1] > waves[1].shape[-1] > 0
    assert all(torch.isfinite(w).all() for w in waves)


def test_overlapping_patches_are_refused():
    from mmblocks.heads import create_head

    tok = AudioPatches(embed_dim=16, num_mel_bins=64, target_frames=48, fstride=10, tstride=10)
    with pytest.raises(ValueError, match="non-overlapping"):
        create_head("reconstruction", 16, detokenizer="waveform", tokenizer=tok)


def test_features_and_sound_under_bf16_autocast(pair):
    """The trainer evaluates under autocast: the fbank target and Griffin-Lim (its IIR de-emphasis refuses mixed
    dtypes) run in float32 anyway."""
    _, dec = pair
    wav = torch.randn(2, 8000) * 0.1
    feats, frames = dec.features(wav)
    with torch.autocast("cpu", torch.bfloat16):
        feats_ac, _ = dec.features(wav)
        waves = dec.to_waveform(feats, frames)
    assert feats_ac.dtype == torch.float32 and torch.equal(feats_ac, feats)
    torch.testing.assert_close(waves[0], dec.to_waveform(feats, frames)[0])
