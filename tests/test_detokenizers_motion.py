"""`motion` detokenizer: the field layout inverts `MotionTokens`, and the warp against NumPy and torus shifts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenizers_mm import Tokens, create_detokenizer, list_detokenizers
from tokenizers_mm.detokenizers import (
    MotionDecoder,
    endpoint_error,
    psnr,
    step_mask,
    upsample_field,
    warp,
    warp_clip,
)
from tokenizers_mm.motion import MotionTokens, block_matching


def numpy_bilinear_warp(image: np.ndarray, flow: np.ndarray, padding: str) -> np.ndarray:
    """Per-pixel reference: out[c, y, x] = image[c, y - dy, x - dx], bilinear, written from the definition."""
    c, h, w = image.shape
    out = np.zeros_like(image, dtype=np.float64)
    for y in range(h):
        for x in range(w):
            sx, sy = x - flow[0, y, x], y - flow[1, y, x]
            x0, y0 = int(np.floor(sx)), int(np.floor(sy))
            ax, ay = sx - x0, sy - y0
            acc = np.zeros(c)
            for yy, wy in ((y0, 1 - ay), (y0 + 1, ay)):
                for xx, wx in ((x0, 1 - ax), (x0 + 1, ax)):
                    if padding == "wrap":
                        v = image[:, yy % h, xx % w]
                    elif padding == "border":
                        v = image[:, min(max(yy, 0), h - 1), min(max(xx, 0), w - 1)]
                    else:
                        v = image[:, yy, xx] if 0 <= yy < h and 0 <= xx < w else np.zeros(c)
                    acc += wy * wx * v
            out[:, y, x] = acc
    return out


@pytest.mark.parametrize("padding", ["border", "zeros", "wrap"])
def test_warp_equals_numpy_bilinear(padding):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 2, 7, 9, generator=g, dtype=torch.float64)
    flow = (torch.rand(1, 2, 7, 9, generator=g, dtype=torch.float64) - 0.5) * 6
    ours = warp(image, flow, padding)[0].numpy()
    ref = numpy_bilinear_warp(image[0].numpy(), flow[0].numpy(), padding)
    np.testing.assert_allclose(ours, ref, atol=1e-9)


def test_warp_clip_reproduces_a_torus_shift_of_a_real_digit():
    """The ground-truth velocity, warped with wrap padding, reproduces a canvas moving on a torus exactly."""
    from sklearn.datasets import load_digits

    digit = torch.tensor(load_digits().images[7], dtype=torch.float32) / 16
    canvas = torch.zeros(1, 1, 32, 32)
    canvas[0, 0, 5:13, 20:28] = digit
    velocity = (3, -2)  # (dx, dy) px per frame
    frames = torch.stack([torch.roll(canvas, (t * velocity[1], t * velocity[0]), dims=(2, 3)) for t in range(6)], 1)
    field = torch.tensor(velocity, dtype=torch.float32).view(1, 1, 2, 1, 1).expand(1, 5, 2, 4, 4)
    out = warp_clip(frames[:, 0], field, block=8, padding="wrap")
    assert torch.equal(out, frames)
    assert psnr(out[:, -1], frames[:, -1]).item() > 100
    still = warp_clip(frames[:, 0], torch.zeros_like(field), block=8, padding="wrap")
    assert psnr(still[:, -1], frames[:, -1]).item() < 20


def test_block_matched_motion_renders_moving_digits_better_than_a_still_keyframe():
    """A real moving-digits clip (noise background): the keyframe warped by block-matched motion beats repeating it."""
    from sklearn.datasets import load_digits

    from mmblocks.data.moving_digits import _background, digit_trajectory, render_clip

    rng = np.random.default_rng(0)
    positions = digit_trajectory((10.0, 20.0), (2.0, 1.0), 8)
    frames = render_clip(load_digits().images[3], positions, _background(rng, 64, "noise"), digit_size=16)
    clip = torch.tensor(frames, dtype=torch.float32).permute(0, 3, 1, 2).unsqueeze(0) / 255  # [1, T, 3, 64, 64]
    field = block_matching(clip, block=8, search=4)  # [1, 7, 2, 8, 8]
    moved = warp_clip(clip[:, 0], field, block=8)
    still = clip[:, :1].expand_as(clip)
    gain = psnr(moved[0, 1:], clip[0, 1:]).mean() - psnr(still[0, 1:], clip[0, 1:]).mean()
    assert gain.item() > 3.0


@pytest.mark.parametrize("pad_first", [True, False])
def test_decoder_layout_inverts_the_motion_tokenizer(pad_first):
    """With the tokenizer's conv as an invertible matrix and the decoder's head as its inverse, decode(tokenize(f))
    gives the field back: the head's (t, row, col) layout is the Conv3d patch layout."""
    tp, p = 2, 2
    d = 2 * tp * p * p
    tok = MotionTokens(embed_dim=d, patch_size=p, t_patch=tp, pos_embed="none", bias=False, pad_first=pad_first)
    dec = MotionDecoder(in_dim=d, patch_size=p, t_patch=tp, scale=tok.scale, pad_first=pad_first)
    torch.manual_seed(0)
    with torch.no_grad():
        m = torch.randn(d, d, dtype=torch.float64) + 4 * torch.eye(d, dtype=torch.float64)
        tok.proj.weight.copy_(m.reshape(d, 2, tp, p, p).float())
        dec.head.weight.copy_(torch.linalg.inv(m).float())
        dec.head.bias.zero_()
    steps = 7 if pad_first else 6
    field = torch.randint(-7, 8, (2, steps, 2, 4, 6)).float()
    tokens = tok(motion=field)
    assert tokens.grid == ((4 if pad_first else 3), 2, 3)
    back = dec(tokens)
    torch.testing.assert_close(back, field, atol=1e-3, rtol=1e-4)
    # a transposed layout (swapping the head's row / col) breaks the round trip
    dec2 = MotionDecoder(in_dim=d, patch_size=p, t_patch=tp, scale=tok.scale, pad_first=pad_first)
    with torch.no_grad():
        perm = torch.arange(d).reshape(2, tp, p, p).transpose(-1, -2).flatten()
        dec2.head.weight.copy_(dec.head.weight[perm])
        dec2.head.bias.zero_()
    assert not torch.allclose(dec2(tokens), field, atol=1e-2)


def test_decoder_with_blocks_trains_to_reconstruct_fields():
    torch.manual_seed(0)
    tok = MotionTokens(embed_dim=32, patch_size=2, t_patch=2, pos_embed="sincos")
    dec = create_detokenizer("motion", in_dim=32, depth=1, num_heads=4)
    opt = torch.optim.AdamW([*tok.parameters(), *dec.parameters()], lr=3e-3)
    first = last = None
    for step in range(60):
        field = torch.randint(-3, 4, (8, 1, 2, 1, 1)).float().expand(8, 7, 2, 4, 4)  # one vector per clip
        loss = dec.loss(dec(tok(motion=field)), field)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if step == 0 else first
        last = loss.item()
    assert last < 0.2 * first


def test_endpoint_error_and_mask():
    a = torch.zeros(2, 3, 2, 2, 2)
    b = a.clone()
    b[:, :, 0] = 3.0
    b[:, :, 1] = 4.0
    assert endpoint_error(a, b).item() == pytest.approx(5.0)
    b[1] = 0.0
    assert endpoint_error(a, b).item() == pytest.approx(2.5)
    mask = torch.tensor([[True] * 3, [False] * 3])
    assert endpoint_error(a, b, mask).item() == pytest.approx(5.0)


def test_step_mask_marks_the_steps_into_real_frames():
    # clip 0 has 4 real frames, clip 1 has 2 and 2 of padding: steps 0-2 lead into frames 1-3
    frames = torch.tensor([[True, True, True, True], [True, True, False, False]])
    assert step_mask(frames).tolist() == [[True, True, True], [True, False, False]]
    assert step_mask(None) is None
    with pytest.raises(ValueError, match=r"frame mask \[B, T\]"):
        step_mask(torch.ones(4, dtype=torch.bool))


def test_registered_and_errors():
    assert "motion" in list_detokenizers()
    dec = MotionDecoder(in_dim=16)
    with pytest.raises(ValueError, match=r"needs the token grid"):
        dec(Tokens(x=torch.randn(1, 8, 16)))
    with pytest.raises(ValueError, match="width 16"):
        dec(Tokens(x=torch.randn(1, 8, 4), grid=(2, 2, 2)))
    with pytest.raises(ValueError, match="padding must be one of"):
        MotionDecoder(in_dim=16, padding="mirror")
    with pytest.raises(ValueError, match="covers"):
        warp_clip(torch.rand(1, 1, 16, 16), torch.zeros(1, 2, 2, 3, 3), block=8)
    assert upsample_field(torch.ones(1, 2, 2, 3), 4).shape == (1, 2, 8, 12)
