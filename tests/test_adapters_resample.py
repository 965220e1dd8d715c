"""Token-count-changing adapters other than `pool`: `perceiver` (Flamingo resampler), `frame_stack` (SLAM-LLM
`EncoderProjectorConcat`) and `pixel_shuffle` (Idefics3 connector, checked against `transformers`)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import adapters.frame_stack
import adapters.perceiver
import adapters.pixel_shuffle
from adapters import create_adapter
from tokenizers_mm import Tokens

CASES = {
    "perceiver": (adapters.perceiver.PerceiverAdapter, {"num_latents": 5, "depth": 2, "heads": 2, "dim_head": 4}),
    "frame_stack": (adapters.frame_stack.FrameStackAdapter, {"k": 4, "hidden_dim": 16}),
    "pixel_shuffle": (adapters.pixel_shuffle.PixelShuffleAdapter, {"scale": 2}),
}


def grid_pos(grid: tuple[int, ...], batch: int, prefix: int = 0) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(*[torch.arange(g, dtype=torch.float32) for g in grid], indexing="ij"), -1)
    coords = torch.cat([torch.full((prefix, len(grid)), -1.0), coords.reshape(-1, len(grid))])
    return coords.unsqueeze(0).expand(batch, -1, -1).clone()


def make_tokens(grid, dim=6, batch=2, prefix=0, seed=0, mask=None, modality="image") -> Tokens:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, prefix + torch.Size(grid).numel(), dim, generator=g)
    return Tokens(x=x, mask=mask, pos=grid_pos(grid, batch, prefix), grid=grid, num_prefix=prefix, modality=modality)


def build(name: str, in_dim: int = 6, out_dim: int = 10, **kw) -> nn.Module:
    torch.manual_seed(0)
    return create_adapter(name, in_dim, out_dim, **{**CASES[name][1], **kw}).eval()


def with_garbage(t: Tokens) -> Tokens:
    """The same tokens with nan / inf / huge values in every masked-out slot of x and pos."""
    x, pos = t.x.clone(), t.pos.clone()
    pad = ~t.mask
    x[pad] = torch.tensor([float("nan"), float("inf"), 1e6, -3.0, 0.0, 7.0]).repeat(int(pad.sum()), 1)
    pos[pad] = 1e4
    return dataclasses.replace(t, x=x, pos=pos)


# ---------------------------------------------------------------------------------------------- all three
@pytest.mark.parametrize("name", sorted(CASES))
def test_create_by_name_and_bad_widths(name):
    cls = CASES[name][0]
    a = build(name)
    assert type(a) is cls and a.changes_token_count and (a.in_dim, a.out_dim) == (6, 10)
    with pytest.raises(ValueError, match=r"expects \[B, N, 6\] tokens, got \(2, 16, 5\)"):
        a(torch.randn(2, 16, 5))
    with pytest.raises(ValueError, match=r"expects \[B, N, 6\] tokens"):
        a(make_tokens((4, 4), dim=7))
    with pytest.raises(TypeError, match=f"adapter {name!r}"):
        create_adapter(name, 6, 10, no_such_kwarg=1)


@pytest.mark.parametrize("name", sorted(CASES))
def test_plain_tensor_in_plain_tensor_out(name):
    a = build(name)
    x = torch.randn(2, 16, 6)
    y = a(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, a.num_output_tokens(16), 10)
    ref = a(Tokens(x=x, grid=(4, 4) if name == "pixel_shuffle" else (16,)))
    torch.testing.assert_close(y, ref.x)


@pytest.mark.parametrize("name", sorted(CASES))
def test_padding_never_changes_real_outputs(name):
    """A right-padded batch: garbage in the padding changes nothing real, and the padded sample equals itself alone."""
    a = build(name)
    grid = (6, 6)
    mask = torch.ones(2, 1 + 36, dtype=torch.bool)
    mask[0, 1 + 20 :] = False  # sample 0: cls + 20 real grid tokens, then 16 padding
    t = make_tokens(grid, prefix=1, mask=mask)
    clean, dirty = a(t), a(with_garbage(t))
    assert torch.isfinite(dirty.x).all()
    if name == "perceiver":
        assert clean.mask is None
        torch.testing.assert_close(clean.x, dirty.x)
        alone = a(Tokens(x=t.x[:1, :21], grid=(20,), num_prefix=1))
        torch.testing.assert_close(clean.x[:1], alone.x, atol=1e-5, rtol=1e-5)
        return
    assert torch.equal(clean.mask, dirty.mask) and not clean.mask[0].all() and clean.mask[1].all()
    torch.testing.assert_close(clean.x[clean.mask], dirty.x[dirty.mask])
    torch.testing.assert_close(clean.pos[clean.mask], dirty.pos[dirty.mask])


# ---------------------------------------------------------------------------------------------- perceiver
def reference_perceiver_attention(attn: adapters.perceiver.PerceiverAttention, x, latents, mask):
    """Flamingo's resampler attention written out: softmax(q k^T / sqrt(d)) v over keys [inputs; latents]."""
    h, d = attn.heads, attn.dim_head
    xn, ln = attn.norm_media(x), attn.norm_latents(latents)
    q = attn.to_q(ln)
    kv = attn.to_kv(torch.cat([xn, ln], dim=1))
    k, v = kv[..., : h * d], kv[..., h * d :]
    q, k, v = (t.reshape(t.shape[0], t.shape[1], h, d).permute(0, 2, 1, 3) for t in (q, k, v))
    sim = q @ k.transpose(-1, -2) / d**0.5
    keep = torch.cat([mask, torch.ones(mask.shape[0], latents.shape[1], dtype=torch.bool)], dim=1)
    sim = sim.masked_fill(~keep[:, None, None, :], float("-inf"))
    out = (sim.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(x.shape[0], latents.shape[1], h * d)
    return attn.to_out(out)


def test_perceiver_attention_reads_inputs_and_latents():
    torch.manual_seed(0)
    attn = adapters.perceiver.PerceiverAttention(8, heads=2, dim_head=4)
    x, latents = torch.randn(2, 7, 8), torch.randn(2, 3, 8)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    torch.testing.assert_close(attn(x, latents, mask), reference_perceiver_attention(attn, x, latents, mask))


def test_perceiver_output_count_is_independent_of_input_length():
    a = build("perceiver", num_latents=7)
    for n in (1, 10, 257):
        out = a(Tokens(x=torch.randn(2, n, 6), modality="audio"))
        assert out.x.shape == (2, 7, 10) and out.grid == (7,) and out.pos is None and out.mask is None
        assert out.modality == "audio" and a.num_output_tokens(n) == 7
    assert len(a.layers) == 2 and isinstance(a.norm, nn.LayerNorm)
    assert a(make_tokens((3, 4, 4))).x.shape == (2, 7, 10)


def test_perceiver_all_padded_sample_is_finite_and_options():
    a = build("perceiver", dim=12)
    assert isinstance(a.proj_in, nn.Linear) and a.latents.shape == (5, 12)
    mask = torch.zeros(2, 17, dtype=torch.bool)
    mask[1] = True
    out = a(with_garbage(make_tokens((4, 4), prefix=1, mask=mask)))
    assert torch.isfinite(out.x).all()
    # drop_special: the cls token is not read
    d = build("perceiver", drop_special=True)
    t = make_tokens((4, 4), prefix=1)
    t2 = dataclasses.replace(t, x=torch.cat([torch.randn(2, 1, 6), t.x[:, 1:]], dim=1))
    torch.testing.assert_close(d(t).x, d(t2).x)
    assert not torch.allclose(build("perceiver")(t).x, build("perceiver")(t2).x)


def test_perceiver_frame_embeddings():
    a = build("perceiver", max_frames=4)
    assert a.frame_embed.shape == (4, 6)
    t = make_tokens((3, 2, 2), prefix=1)
    with torch.no_grad():
        a.frame_embed.normal_()
    manual = t.x.clone()
    manual[:, 1:] += a.frame_embed[:3].repeat_interleave(4, dim=0)
    no_time = build("perceiver")
    no_time.load_state_dict({k: v for k, v in a.state_dict().items() if k != "frame_embed"})
    torch.testing.assert_close(a(t).x, no_time(dataclasses.replace(t, x=manual)).x)
    with pytest.raises(ValueError, match="max_frames=4, got a grid of 5 frames"):
        a(make_tokens((5, 2, 2)))


# ---------------------------------------------------------------------------------------------- frame_stack
def test_frame_stack_equals_slam_concat_projector():
    a = build("frame_stack", k=5, hidden_dim=16)
    assert [type(m) for m in a.net] == [nn.Linear, nn.ReLU, nn.Linear] and a.net[0].in_features == 30
    t = make_tokens((23,), prefix=1, modality="audio")
    out = a(t)
    # SLAM-LLM EncoderProjectorConcat: drop T % k frames, view (B, T // k, k * D), linear1, relu, linear2
    g = t.x[:, 1:]
    ref = a.net(g[:, :20].contiguous().view(2, 4, 30))
    torch.testing.assert_close(out.x, ref)
    torch.testing.assert_close(out.x[:, 1], a.net(torch.cat([g[:, i] for i in range(5, 10)], dim=-1)))
    assert out.grid == (4,) and out.num_prefix == 0 and out.modality == "audio" and out.mask is None
    torch.testing.assert_close(out.pos[0, :, 0], torch.tensor([0.0, 5.0, 10.0, 15.0]))  # first token of each group
    assert a.num_output_tokens(23) == 4 and a.num_output_tokens(t) == 4


def test_frame_stack_pad_remainder_and_masks():
    drop, pad = build("frame_stack", k=4), build("frame_stack", k=4, remainder="pad")
    mask = torch.ones(2, 14, dtype=torch.bool)
    mask[0, 9:] = False  # 9 real frames of 14
    t = make_tokens((14,), mask=mask, modality="audio")
    a, b = drop(t), pad(t)
    assert a.grid == (3,) and b.grid == (4,) and pad.num_output_tokens(14) == 4
    assert a.mask.tolist() == [[True, True, True], [True] * 3]  # group 2 starts at frame 8: real
    assert b.mask.tolist() == [[True, True, True, False], [True] * 4]
    zeros = torch.cat([t.x[1, 12:14], torch.zeros(2, 6)]).reshape(1, 24)
    torch.testing.assert_close(b.x[1, 3], pad.net(zeros)[0])
    # the padded sample equals itself alone: all outputs with "pad", the common ones with "drop"
    alone = make_tokens((9,), batch=1, modality="audio")
    alone = dataclasses.replace(alone, x=t.x[:1, :9])
    torch.testing.assert_close(b.x[:1, :3], pad(alone).x)
    torch.testing.assert_close(a.x[:1, :2], drop(alone).x)
    with pytest.raises(ValueError, match="k=4, remainder='drop' needs at least 4 grid tokens, got 3"):
        drop(make_tokens((3,)))
    with pytest.raises(ValueError, match="remainder must be one of"):
        build("frame_stack", remainder="wrap")


# ---------------------------------------------------------------------------------------------- pixel_shuffle
def hf_connector(in_dim: int, out_dim: int, scale: int):
    from transformers import Idefics3Config
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

    config = Idefics3Config(
        vision_config={"hidden_size": in_dim, "num_attention_heads": 2},
        text_config={"model_type": "llama", "hidden_size": out_dim, "num_attention_heads": 2, "num_key_value_heads": 2},
        scale_factor=scale,
    )
    return Idefics3Connector(config).eval()


@pytest.mark.parametrize("side,scale", [(4, 2), (6, 3), (8, 4)])
def test_pixel_shuffle_equals_hf_idefics3(side, scale):
    hf = hf_connector(6, 12, scale)  # LLM width: a multiple of 2 heads with an even head_dim
    x = torch.randn(2, side * side, 6, generator=torch.Generator().manual_seed(side))
    ours = adapters.pixel_shuffle.pixel_shuffle(x, (side, side), scale)
    torch.testing.assert_close(ours, hf.pixel_shuffle(x, scale), rtol=0, atol=0)
    a = build("pixel_shuffle", out_dim=12, scale=scale)
    with torch.no_grad():
        a.proj.weight.copy_(hf.modality_projection.proj.weight)
    assert a.proj.bias is None
    t = Tokens(x=torch.cat([torch.randn(2, 1, 6), x], dim=1), grid=(side, side), num_prefix=1)
    torch.testing.assert_close(a(t).x, hf(x))


def test_pixel_shuffle_non_square_grid_order_and_pos():
    t = make_tokens((4, 6), prefix=1)
    out = build("pixel_shuffle")(t)
    assert out.grid == (2, 3) and out.num_prefix == 0 and out.modality == "image"
    g = t.x[:, 1:].reshape(2, 4, 6, 6)
    shuffled = adapters.pixel_shuffle.pixel_shuffle(t.x[:, 1:], (4, 6), 2)
    for a in range(2):
        for b in range(3):
            block = [g[:, 2 * a + i, 2 * b + j] for i in range(2) for j in range(2)]
            torch.testing.assert_close(shuffled[:, 3 * a + b], torch.cat(block, dim=-1))
    want = torch.tensor([[2 * a + 0.5, 2 * b + 0.5] for a in range(2) for b in range(3)])
    torch.testing.assert_close(out.pos, want.expand(2, -1, -1))
    assert build("pixel_shuffle").num_output_tokens(t) == 6 and build("pixel_shuffle").num_output_tokens(64) == 16


def test_pixel_shuffle_bad_grids():
    a = build("pixel_shuffle", scale=2)
    with pytest.raises(ValueError, match=r"divisible by 2 on both axes, got \(4, 5\)"):
        a(make_tokens((4, 5)))
    with pytest.raises(ValueError, match=r"needs a 2D \(H, W\) token grid, got grid=\(16,\)"):
        a(make_tokens((16,)))
    with pytest.raises(ValueError, match="N=15 is not a square"):
        a(torch.randn(1, 15, 6))
    broken = make_tokens((4, 4), prefix=1)
    broken.grid = (2, 4)
    with pytest.raises(ValueError, match=r"grid \(2, 4\) holds 8 tokens, but there are 16 grid tokens"):
        a(broken)
