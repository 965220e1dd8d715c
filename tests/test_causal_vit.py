"""iLLaMA's causal ViT: attention implementations, the soft-mask schedule, cls-last tokens and encoder use."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmblocks.heads import ClassifierHead
from mmblocks.layers import masked_attention, soft_mask_weights
from mmblocks.models import CausalViT, MMEncoder, SoftMaskSchedule, advance_soft_masks, causal_vit
from mmblocks.models.causal_vit import swiglu_hidden_dim
from tokenizers_mm import ImagePatches, Tokens, create_tokenizer

IMG = 32  # 2x2 patches of 16


def _vit(**kw) -> CausalViT:
    torch.manual_seed(0)
    return CausalViT("tiny", img_size=IMG, depth=2, **kw)


def _same_weights(dst: CausalViT, src: CausalViT) -> CausalViT:
    params = {k: v for k, v in src.state_dict().items() if not k.endswith("soft_mask_ratio")}
    missing, unexpected = dst.load_state_dict(params, strict=False)
    assert not unexpected and all(k.endswith("soft_mask_ratio") for k in missing)
    return dst


# ------------------------------------------------------------------------------------------------ attention math
def _hand_example():
    """d = 1, scale 1: row 0 scores [0, ln 3] -> softmax [1/4, 3/4]; values 4 and 8."""
    q = torch.tensor([1.0, 1.0]).view(1, 1, 2, 1)
    k = torch.tensor([0.0, math.log(3.0)]).view(1, 1, 2, 1)
    v = torch.tensor([4.0, 8.0]).view(1, 1, 2, 1)
    return q, k, v


def test_post_softmax_mult_is_the_illama_formula_on_a_hand_example():
    q, k, v = _hand_example()
    # r = 0: row 0 keeps 1/4 of v0 and drops the rest, without renormalising (0.25 * 4 = 1); row 1 = 1 + 6
    out = masked_attention(q, k, v, mode="causal", causal_impl="post_softmax_mult", scale=1.0)
    assert out.flatten().tolist() == pytest.approx([1.0, 7.0])
    # r = 0.5: M = [[1, .5], [1, 1]] -> row 0 = 1/4 * 4 + 3/8 * 8 = 4
    out = masked_attention(q, k, v, mode="soft", causal_impl="post_softmax_mult", ratio=0.5, scale=1.0)
    assert out.flatten().tolist() == pytest.approx([4.0, 7.0])
    # pre_softmax renormalises: causal row 0 = v0; soft r = .5 weights [1/4, 3/8] / (5/8) -> 0.4 * 4 + 0.6 * 8
    out = masked_attention(q, k, v, mode="causal", causal_impl="pre_softmax", scale=1.0)
    assert out.flatten().tolist() == pytest.approx([4.0, 7.0])
    out = masked_attention(q, k, v, mode="soft", causal_impl="pre_softmax", ratio=0.5, scale=1.0)
    assert out.flatten().tolist() == pytest.approx([6.4, 7.0])
    assert soft_mask_weights(0.25, 3).tolist() == [[1, 0.25, 0.25], [1, 1, 0.25], [1, 1, 1]]


def test_post_softmax_mult_matches_the_formula_on_random_inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 8, generator=g) for _ in range(3))
    for r in (0.0, 0.3, 1.0):
        ref = ((q @ k.transpose(-2, -1)) * 8**-0.5).softmax(-1) * (r + (1 - r) * torch.ones(6, 6).tril())
        out = masked_attention(q, k, v, mode="soft", causal_impl="post_softmax_mult", ratio=r)
        torch.testing.assert_close(out, ref @ v, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("impl", ["pre_softmax", "post_softmax_mult"])
def test_soft_mask_end_points(impl):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g) for _ in range(3))
    bi = masked_attention(q, k, v, mode="bidirectional")
    ca = masked_attention(q, k, v, mode="causal", causal_impl=impl)
    torch.testing.assert_close(masked_attention(q, k, v, mode="soft", causal_impl=impl, ratio=1.0), bi)
    torch.testing.assert_close(masked_attention(q, k, v, mode="soft", causal_impl=impl, ratio=torch.tensor(0.0)), ca)


@pytest.mark.parametrize("impl", ["pre_softmax", "post_softmax_mult"])
def test_padded_keys_change_nothing(impl):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 8, generator=g) for _ in range(3))
    pad = lambda t: torch.cat([t, 1e3 * torch.randn(1, 2, 3, 8, generator=g)], dim=2)  # noqa: E731
    bias = torch.zeros(1, 1, 1, 8)
    bias[..., 5:] = float("-inf")
    for mode, r in (("causal", None), ("soft", 0.4), ("bidirectional", None)):
        alone = masked_attention(q, k, v, mode=mode, causal_impl=impl, ratio=r)
        padded = masked_attention(pad(q), pad(k), pad(v), mode=mode, causal_impl=impl, ratio=r, attn_mask=bias)
        torch.testing.assert_close(padded[:, :, :5], alone, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ the schedule
def test_schedule_values():
    lin = SoftMaskSchedule("linear", cutoff=10, unit="steps")
    assert [lin.value(s) for s in (0, 5, 10, 50)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    const = SoftMaskSchedule("constant", cutoff=10, unit="steps", r_start=0.8)
    assert [const.value(s) for s in (0, 9, 10)] == [0.8, 0.8, 0.0]
    ep = SoftMaskSchedule("linear", cutoff=2, unit="epochs")
    assert ep.value(50, steps_per_epoch=100) == pytest.approx(0.75)  # epoch 0.5 of 2
    assert ep.value(0, epoch=1.0) == pytest.approx(0.5)  # fractional epochs when the epoch length is unknown
    assert ep.value(200, steps_per_epoch=100) == 0.0
    assert SoftMaskSchedule("linear", cutoff=4, unit="steps", r_start=0.6, r_end=0.2).value(2) == pytest.approx(0.4)
    assert SoftMaskSchedule("constant", cutoff=None).value(10**6) == 1.0
    assert SoftMaskSchedule("linear", cutoff=0, unit="steps").value(0) == 0.0
    assert SoftMaskSchedule.create(0.3).value(123) == pytest.approx(0.3)
    assert SoftMaskSchedule.create({"mode": "constant", "cutoff": 5, "unit": "steps"}).value(5) == 0.0
    with pytest.raises(ValueError, match="steps_per_epoch"):
        ep.value(3)
    with pytest.raises(ValueError, match="mode must be one of"):
        SoftMaskSchedule("cosine")
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        SoftMaskSchedule(r_start=1.5)
    with pytest.raises(ValueError, match="unknown soft mask schedule keys"):
        SoftMaskSchedule.create({"cutoff_epoch": 5})


def test_schedule_state_dict_resume_is_exact():
    sched = SoftMaskSchedule("linear", cutoff=3, unit="epochs", r_start=0.9)
    full = [sched.value(s, steps_per_epoch=7) for s in range(30)]
    resumed = SoftMaskSchedule()
    resumed.load_state_dict(sched.state_dict())
    assert resumed == sched and resumed.last_step == 29
    assert [resumed.value(s, steps_per_epoch=7) for s in range(12, 30)] == full[12:]


def test_advance_soft_masks_sets_every_block_and_checkpoints_keep_r():
    sched = {"mode": "linear", "cutoff": 10, "unit": "steps"}
    vit = _vit(attention="soft", soft_mask=sched)
    assert vit.soft_mask_ratio == 1.0
    enc = MMEncoder(vit.make_tokenizer(), vit, None, None)
    assert advance_soft_masks(enc, 4) == {"backbone": pytest.approx(0.6)}
    assert all(float(b.attn.soft_mask_ratio) == pytest.approx(0.6) for b in vit.blocks)
    state = enc.state_dict()
    assert "backbone.blocks.0.attn.soft_mask_ratio" in state  # a persistent buffer: kept by checkpoints
    fresh = _vit(attention="soft", soft_mask=sched)
    fresh.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")})
    assert fresh.soft_mask_ratio == pytest.approx(0.6)
    assert advance_soft_masks(_vit(), 4) == {}  # nothing soft: nothing to do
    with pytest.raises(ValueError, match="needs attention='soft'"):
        _vit().set_soft_mask_ratio(0.5)
    with pytest.raises(ValueError, match="needs a soft_mask schedule"):
        _vit(attention="soft")


# ------------------------------------------------------------------------------------------------ the model
def test_tokenizer_puts_cls_last():
    tok = create_tokenizer("image_patches", img_size=IMG, patch_size=16, embed_dim=24, cls_position="last")
    assert isinstance(tok, ImagePatches) and tok.cls_position == "last"
    images = torch.randn(2, 3, IMG, 48)
    tokens = tok(images)
    assert tokens.x.shape == (2, 7, 24) and tokens.grid == (2, 3)
    assert tokens.num_prefix == 0 and tokens.num_suffix == 1
    assert tokens.pos[0, -1].tolist() == [-1.0, -1.0] and tokens.pos[0, :3].tolist() == [[0, 0], [0, 1], [0, 2]]
    pos_embed = tok._positions(2, 3)
    torch.testing.assert_close(tokens.x[:, -1], (tok.cls_token + pos_embed[:, :1]).expand(2, -1, -1)[:, 0])
    patches = tok.patch_embed(images).reshape(2, 6, 24)
    torch.testing.assert_close(tokens.grid_tokens(), patches + pos_embed[:, 1:])


@pytest.mark.parametrize("no_embed_class", [False, True])
def test_tokenizer_loads_a_timm_vit_with_the_cls_moved_last(no_embed_class):
    from mmblocks.models import create_timm_vit

    vit = create_timm_vit("vit_tiny_patch16_224", img_size=IMG, no_embed_class=no_embed_class).eval()
    tok = ImagePatches.from_timm(vit, cls_position="last")
    images = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        ours = tok(images)
        ref = vit._pos_embed(vit.patch_embed(images))  # timm: [cls, patches] with positions added
    torch.testing.assert_close(ours.x, torch.cat([ref[:, 1:], ref[:, :1]], dim=1))


def test_cls_last_needs_one_class_token_and_no_registers():
    with pytest.raises(ValueError, match="class_token=True and no registers"):
        ImagePatches(img_size=IMG, embed_dim=24, num_registers=2, cls_position="last")
    with pytest.raises(ValueError, match="class_token=True"):
        ImagePatches(img_size=IMG, embed_dim=24, class_token=False, cls_position="last")
    with pytest.raises(ValueError, match="cls_position must be one of"):
        ImagePatches(img_size=IMG, embed_dim=24, cls_position="middle")


def test_presets_and_illama_sizes():
    assert swiglu_hidden_dim(192) == 512 and swiglu_hidden_dim(384) == 1024 and swiglu_hidden_dim(768) == 2048
    tiny = causal_vit("tiny")
    assert (tiny.embed_dim, tiny.depth, tiny.num_heads) == (192, 12, 3)
    n = sum(p.numel() for p in tiny.parameters()) + 192 * 1000 + 1000  # + a 1000-class head
    assert abs(n - 5.7e6) < 0.1e6, n  # iLLaMA-T: 5.7M
    blk = tiny.blocks[0]
    assert type(blk.norm1).__name__ == "RmsNorm" and type(blk.mlp).__name__ == "SwiGLU"
    assert blk.mlp.fc1_g.bias is None and blk.attn.qkv.bias is not None


def _randomise_(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random, seeded: weights N(0, 1/fan_in); biases, norm scales, the cls token and the position
    table N(0, 1) (iLLaMA's init leaves biases at 0, norm scales at 1 and the cls token near 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            std = math.prod(p.shape[1:]) ** -0.5 if p.dim() >= 2 and p.shape[0] > 1 else 1.0
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * std)


def _rms_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight.double()


def _linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    y = x @ layer.weight.double().T
    return y if layer.bias is None else y + layer.bias.double()


def _rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """RoPE in the rotate-half layout: channel ``i`` and ``i + d/2`` rotate together by ``angles[..., i]``."""
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def _rope_angles(vit: CausalViT, n: int, grid: tuple[int, int], head_dim: int, theta: float = 1e4) -> torch.Tensor:
    """``[n, head_dim / 2]`` angles. 1-D (iLLaMA): token ``t`` (cls included) rotates pair ``i`` by
    ``t * theta^(-2i/d)``. 2-D (VisionLLaMA): pair ``2m + a`` rotates by ``(row, col)[a] * theta^(-4m/d)``; the cls
    token is not rotated."""
    half = head_dim // 2
    if vit.rope == "1d":
        inv = theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / head_dim)
        return torch.arange(n, dtype=torch.float64)[:, None] * inv
    angles = torch.zeros(n, half, dtype=torch.float64)
    first = 1 if vit.cls_position == "first" else 0
    for t in range(grid[0] * grid[1]):
        row, col = divmod(t, grid[1])
        for m in range(half // 2):
            freq = theta ** (-4.0 * m / head_dim)
            angles[first + t, 2 * m], angles[first + t, 2 * m + 1] = row * freq, col * freq
    return angles


def reference_causal_vit(vit: CausalViT, images: torch.Tensor, ratio: float | None = None) -> torch.Tensor:
    """iLLaMA's forward (arXiv 2404.06773) written out in float64 from the weights, with plain tensor ops: patch
    embedding as reshape + matmul, learned positions, the cls token after (or before) the patches, pre-norm blocks
    (RMSNorm, fused qkv, RoPE, masked softmax attention, proj, RMSNorm, SwiGLU), final RMSNorm. The mask is explicit:
    ``causal`` (``pre_softmax``) sets the scores above the diagonal to -inf before the softmax; ``post_softmax_mult``
    multiplies the softmax by the lower triangle (no renormalisation); ``soft`` (``pre_softmax``) weights the
    softmax by ``M = r + (1 - r) tril`` and renormalises; ``bidirectional`` masks nothing. Returns ``[B, N, D]``."""
    tok = vit.make_tokenizer()
    proj = tok.patch_embed.proj
    d, c, p, _ = proj.weight.shape
    b, _, hh, ww = images.shape
    grid = (hh // p, ww // p)
    x = images.double().reshape(b, c, grid[0], p, grid[1], p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
    x = x @ proj.weight.double().reshape(d, -1).T + proj.bias.double()
    table = tok.pos_embed.double()  # [1, 1 + h*w, D], the cls entry first (timm's layout)
    cls = (tok.cls_token.double() + table[:, :1]).expand(b, -1, -1)
    x = x + table[:, 1:]
    x = torch.cat([x, cls] if vit.cls_position == "last" else [cls, x], dim=1)
    n, heads = x.shape[1], vit.num_heads
    hd = d // heads
    allowed = torch.ones(n, n, dtype=torch.bool).tril()  # query i sees key j <= i
    angles = _rope_angles(vit, n, grid, hd) if vit.rope != "none" else None
    for blk in vit.blocks:
        h = _rms_norm(x, blk.norm1)
        q, k, v = _linear(h, blk.attn.qkv).reshape(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
        if angles is not None:
            q, k = _rotate(q, angles), _rotate(k, angles)
        scores = q @ k.transpose(-2, -1) / math.sqrt(hd)
        if vit.attention == "bidirectional":
            weights = scores.softmax(-1)
        elif vit.attention == "causal" and vit.causal_impl == "pre_softmax":
            weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        elif vit.attention == "causal":  # post_softmax_mult
            weights = scores.softmax(-1) * allowed
        else:  # soft, pre_softmax
            unnorm = scores.exp() * torch.where(allowed, 1.0, ratio)
            weights = unnorm / unnorm.sum(-1, keepdim=True)
        out = (weights @ v).transpose(1, 2).reshape(b, n, d)
        x = x + _linear(out, blk.attn.proj)
        h = _rms_norm(x, blk.norm2)
        x = x + _linear(F.silu(_linear(h, blk.mlp.fc1_g)) * _linear(h, blk.mlp.fc1_x), blk.mlp.fc2)
    return _rms_norm(x, vit.norm)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"causal_impl": "post_softmax_mult"},
        {"attention": "soft", "soft_mask": 0.5},
        {"attention": "bidirectional", "rope": "2d", "rope_train_grid": "auto"},
        {"cls_position": "first", "rope": "none"},
        {"cls_position": "first", "rope": "2d"},
    ],
)
def test_forward_equals_the_written_out_illama_reference(kw):
    """Encoder and direct forward against `reference_causal_vit` (an independent float64 forward from the weights,
    every parameter random): a wrong mask (e.g. bidirectional where causal), rotary, cls placement or readout fails.
    Tolerance: float32 (the model's dtype) epsilons."""
    vit = CausalViT("tiny", img_size=(IMG, 48), depth=2, **kw)  # a 2 x 3 grid, at the training size
    _randomise_(vit, seed=len(kw))
    ratio = None
    if vit.attention == "soft":
        ratio = 0.3
        vit.set_soft_mask_ratio(ratio)
    tok = vit.make_tokenizer()
    head = ClassifierHead(vit.embed_dim, 5, pool=vit.readout)
    _randomise_(head, seed=100)
    enc = MMEncoder(tok, vit, None, head).eval()
    images = torch.randn(2, 3, IMG, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = enc.forward_features(images)
        logits = enc(images)
        direct = vit.forward_features(images)
    ref = reference_causal_vit(vit, images, ratio)
    assert feats.x.shape == ref.shape == (2, 7, 192) and logits.shape == (2, 5)
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(feats.x.double(), ref, rtol=256 * eps, atol=256 * eps)
    torch.testing.assert_close(direct.x.double(), ref, rtol=256 * eps, atol=256 * eps)
    readout = ref[:, -1] if vit.cls_position == "last" else ref[:, 0]
    ref_logits = readout @ head.fc.weight.double().T + head.fc.bias.double()
    torch.testing.assert_close(logits.double(), ref_logits, rtol=256 * eps, atol=256 * eps)
    if vit.cls_position == "last":
        assert feats.num_suffix == 1 and head.pool == "last"
    else:
        assert feats.num_prefix == 1 and head.pool == "cls"


def test_pre_softmax_causal_prefix_does_not_depend_on_later_tokens():
    vit = _vit().eval()
    x = torch.randn(2, 9, 192, generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[:, 5:] = torch.randn(2, 4, 192)
    with torch.no_grad():
        a, b = vit(Tokens(x)).x, vit(Tokens(y)).x
    torch.testing.assert_close(a[:, :5], b[:, :5], atol=1e-6, rtol=0)
    # the last (cls) token sees everything
    assert not torch.allclose(a[:, -1], b[:, -1], atol=1e-4)
    # iLLaMA's post-softmax variant is not strictly causal: the softmax normaliser sees later tokens
    post = _same_weights(_vit(causal_impl="post_softmax_mult"), vit).eval()
    with torch.no_grad():
        assert not torch.allclose(post(Tokens(x)).x[:, :5], post(Tokens(y)).x[:, :5], atol=1e-4)


@pytest.mark.parametrize("impl", ["pre_softmax", "post_softmax_mult"])
def test_soft_vit_end_points(impl):
    ref = _vit().eval()
    bi = _same_weights(_vit(attention="bidirectional"), ref).eval()
    ca = _same_weights(_vit(attention="causal", causal_impl=impl), ref).eval()
    soft = _same_weights(_vit(attention="soft", causal_impl=impl, soft_mask={"cutoff": 4, "unit": "steps"}), ref)
    soft.eval()
    tokens = Tokens(torch.randn(2, 9, 192, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        advance_soft_masks(soft, 0)
        torch.testing.assert_close(soft(tokens).x, bi(tokens).x, atol=1e-5, rtol=1e-5)
        advance_soft_masks(soft, 4)
        torch.testing.assert_close(soft(tokens).x, ca(tokens).x, atol=1e-5, rtol=1e-5)
        advance_soft_masks(soft, 2)
        mid = soft(tokens).x
    assert not torch.allclose(mid, bi(tokens).x, atol=1e-4) and not torch.allclose(mid, ca(tokens).x, atol=1e-4)


def test_two_d_rope_follows_the_grid_of_non_square_images():
    vit = _vit(rope="2d", attention="bidirectional")
    enc = MMEncoder(vit.make_tokenizer(), vit, None, None).eval()
    with torch.no_grad():
        out = enc(torch.randn(1, 3, IMG, 48))  # 2x3 grid: the tokenizer hook records it
    assert out.x.shape == (1, 7, 192) and vit.rope_embed._grid == (2, 3)
    bare = _vit(rope="2d", image_tokenizer=False)
    with pytest.raises(ValueError, match="not a square"):
        bare(Tokens(torch.randn(1, 7, 192)))
    with pytest.raises(ValueError, match="rope_train_grid"):
        _vit(rope="1d", rope_train_grid=(2, 2))


def test_soft_vit_trains():
    vit = _vit(attention="soft", soft_mask={"cutoff": 4, "unit": "steps"}, drop_path_rate=0.1).train()
    enc = MMEncoder(vit.make_tokenizer(), vit, None, ClassifierHead(192, 3, pool="last"))
    advance_soft_masks(enc, 1)
    loss = torch.nn.functional.cross_entropy(enc(torch.randn(2, 3, IMG, IMG)), torch.tensor([0, 2]))
    loss.backward()
    assert all(p.grad is not None for p in enc.trainable_parameters())


def test_causal_vit_presets_match_the_size_literal():
    from typing import get_args

    from mmblocks.models.causal_vit import CAUSAL_VIT_PRESETS, CausalViTSize

    assert set(CAUSAL_VIT_PRESETS) == set(get_args(CausalViTSize))
