"""Image tokenizer, adapters, heads and `MMEncoder`, checked against timm where timm is the oracle."""

from __future__ import annotations

import pytest
import torch

from adapters import create_adapter, list_adapters
from mmblocks.heads import ClassifierHead
from mmblocks.llm import load_blocks
from mmblocks.models import LLMStage, MMEncoder, TimmViT, create_timm_vit
from tokenizers_mm import ImagePatches, Tokens, create_tokenizer, list_tokenizers


def _vit(**kw):
    torch.manual_seed(0)
    kw = {"img_size": 32, "patch_size": 4, "depth": 3, "embed_dim": 64, "num_heads": 4, **kw}
    return create_timm_vit("vit_tiny_patch16_224", **kw).eval()


@pytest.mark.parametrize(
    "kw",
    [{}, {"reg_tokens": 4}, {"reg_tokens": 2, "no_embed_class": True}, {"class_token": False, "global_pool": "avg"}],
)
@pytest.mark.parametrize("size", [32, 48])
def test_image_patches_equals_timm_token_layout(kw, size):
    """Patch embedding, cls/register tokens, positions and their interpolation equal timm's own `_pos_embed`
    (timm is the external oracle), with every parameter of the timm model random (timm's init leaves the cls and
    register tokens at ~1e-6 and the conv bias at 0, which would hide a dropped or misplaced one)."""
    vit = _vit(**kw)
    _randomise_(vit.patch_embed, vit.cls_token, vit.reg_token, vit.pos_embed, seed=size)
    tok = ImagePatches.from_timm(vit)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref = vit._pos_embed(vit.patch_embed(x))
        out = tok(x)
    torch.testing.assert_close(out.x, ref, **_tol(torch.float32))
    g = size // 4
    assert out.grid == (g, g) and out.num_prefix == vit.num_prefix_tokens and out.modality == "image"
    assert out.pos.shape == (2, out.num_tokens, 2)
    torch.testing.assert_close(out.pos[0, out.num_prefix + g + 1], torch.tensor([1.0, 1.0]))


def _tol(dtype: torch.dtype, k: float = 16.0) -> dict[str, float]:
    """``assert_close`` tolerances of `k` units of `dtype`'s machine epsilon."""
    eps = torch.finfo(dtype).eps
    return {"rtol": k * eps, "atol": k * eps}


def _randomise_(*params: torch.nn.Module | torch.Tensor | None, seed: int = 0, std: float = 1.0) -> None:
    """Every parameter of the given modules / tensors (None skipped) to N(0, std^2), seeded."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for item in params:
            if item is None:
                continue
            for p in item.parameters() if isinstance(item, torch.nn.Module) else [item]:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * std)


def reference_patch_tokens(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    prefix: torch.Tensor | None,
    pos_table: torch.Tensor | None,
    no_embed_class: bool,
) -> torch.Tensor:
    """ViT's token layout written out (Dosovitskiy et al. 2021, eq. 1), in float64, without a convolution: cut the
    image into non-overlapping ``p x p`` patches in row-major order, flatten each as ``(c, i, j)``, multiply by the
    conv weight seen as ``[D, C p p]`` and add the bias; prepend the prefix tokens (cls, registers); add the position
    table to every token (or, ``no_embed_class``, to the patches only)."""
    d, c, p, _ = weight.shape
    b, _, hh, ww = images.shape
    h, w = hh // p, ww // p
    patches = images.double().reshape(b, c, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, c * p * p)
    x = patches @ weight.double().reshape(d, c * p * p).T
    if bias is not None:
        x = x + bias.double()
    if pos_table is not None and no_embed_class:
        x = x + pos_table.double()
    if prefix is not None:
        x = torch.cat([prefix.double().expand(b, -1, -1), x], dim=1)
    if pos_table is not None and not no_embed_class:
        x = x + pos_table.double()
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "kw",
    [
        {"class_token": False, "pos_embed": "none"},
        {"class_token": False, "pos_embed": "none", "bias": False},
        {},
        {"num_registers": 3},
        {"num_registers": 2, "no_embed_class": True},
    ],
)
def test_image_patches_equal_the_unfolded_patch_matmul(kw, dtype):
    """Independent oracle of `ImagePatches` (patch embedding, prefix tokens, positions) at the training size: the
    patch embedding as reshape + matmul with the conv weights, every parameter random, a non-square image."""
    tok = ImagePatches(img_size=(24, 32), patch_size=4, in_chans=3, embed_dim=20, **kw).to(dtype)
    _randomise_(tok, seed=len(kw))
    images = torch.randn(2, 3, 24, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    with torch.no_grad():
        out = tok(images)
    prefix = [t for t in (tok.cls_token, tok.reg_token) if t is not None]
    proj = tok.patch_embed.proj
    ref = reference_patch_tokens(
        images,
        proj.weight,
        proj.bias,
        torch.cat(prefix, dim=1) if prefix else None,
        tok.pos_embed,
        kw.get("no_embed_class", False),
    )
    num_prefix = int(kw.get("class_token", True)) + kw.get("num_registers", 0)
    assert out.x.dtype == dtype and out.grid == (6, 8) and out.num_prefix == num_prefix
    assert out.x.shape == ref.shape == (2, num_prefix + 48, 20)
    assert (proj.bias is None) == (kw.get("bias") is False)
    torch.testing.assert_close(out.x.double(), ref, **_tol(dtype, 64))


def test_image_patches_sincos_and_errors():
    tok = create_tokenizer("image_patches", img_size=32, patch_size=8, embed_dim=32, pos_embed="sincos")
    assert "image_patches" in list_tokenizers()
    assert tok(torch.randn(1, 3, 32, 32)).x.shape == (1, 17, 32)
    assert not any(p is tok.pos_embed for p in tok.parameters()), "sin-cos positions are fixed"
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        tok(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="expects 3 channels"):
        tok(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="pos_embed must be one of"):
        ImagePatches(pos_embed="rope")


@pytest.mark.parametrize("kw", [{}, {"reg_tokens": 2}, {"class_token": False, "global_pool": "avg"}])
def test_baseline_encoder_equals_timm_forward_features(kw):
    vit = _vit(**kw)
    enc = MMEncoder(ImagePatches.from_timm(vit), TimmViT.from_timm(vit)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc.forward_features(x).x, vit.forward_features(x), atol=1e-6, rtol=0)


def _llm_encoder(tiny_checkpoint, insert_at=None, tune="frozen"):
    vit = _vit()
    blocks = load_blocks(tiny_checkpoint("llama"), [-1], tune=tune)
    stage = LLMStage(create_adapter("linear", 64, 64), blocks, create_adapter("linear", 64, 64))
    head = ClassifierHead(64, 5)
    return MMEncoder(ImagePatches.from_timm(vit), TimmViT.from_timm(vit), stage, head, insert_at=insert_at)


def test_frozen_block_encoder_gradients(tiny_checkpoint):
    enc = _llm_encoder(tiny_checkpoint).train()
    logits = enc(torch.randn(3, 3, 32, 32))
    assert logits.shape == (3, 5)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    stage = enc.llm_stage
    assert all(p.grad is None for p in stage.blocks.parameters()), "the frozen block gets no gradient"
    assert stage.adapter_in.proj.weight.grad.abs().sum() > 0 and stage.adapter_out.proj.weight.grad.abs().sum() > 0
    assert enc.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert enc.tokenizer.patch_embed.proj.weight.grad.abs().sum() > 0
    trainable = {id(p) for p in enc.trainable_parameters()}
    assert not any(id(p) in trainable for p in stage.blocks.parameters())
    table = enc.parameter_table()
    assert "llm blocks" in table and "adapter_in" in table


def test_insert_at_and_intermediates(tiny_checkpoint):
    enc = _llm_encoder(tiny_checkpoint, insert_at=1).eval()
    assert enc.layer_names() == ["block.0", "llm", "block.1", "block.2"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, inter = enc.forward_intermediates(x, indices=[0, 1, -1])
        torch.testing.assert_close(final.x, enc.forward_features(x).x)
    assert len(inter) == 3 and all(isinstance(t, Tokens) for t in inter)
    with pytest.raises(IndexError, match="out of range"):
        enc.forward_intermediates(x, indices=[7])
    with pytest.raises(ValueError, match=r"insert_at must be in 0\.\.3"):
        MMEncoder(enc.tokenizer, enc.backbone, enc.llm_stage, insert_at=4)


def test_llm_stage_width_check(tiny_checkpoint):
    blocks = load_blocks(tiny_checkpoint("llama"), [-1])
    with pytest.raises(ValueError, match="must equal the LLM hidden size 64"):
        LLMStage(create_adapter("linear", 32, 48), blocks, create_adapter("linear", 64, 32))


def test_classifier_head_pooling():
    x = torch.arange(2 * 6 * 2, dtype=torch.float32).reshape(2, 6, 2)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    t = Tokens(x, mask=mask, grid=(5,), num_prefix=1)
    pooled = {p: ClassifierHead(2, 3, pool=p).pool_tokens(t) for p in ("cls", "mean", "last", "cls+max")}
    torch.testing.assert_close(pooled["cls"], x[:, 0])
    torch.testing.assert_close(pooled["mean"][0], x[0, 1:].mean(0))
    torch.testing.assert_close(pooled["mean"][1], x[1, 1:4].mean(0))
    torch.testing.assert_close(pooled["last"], torch.stack([x[0, 5], x[1, 3]]))
    torch.testing.assert_close(pooled["cls+max"][1], torch.cat([x[1, 0], x[1, 3]]))
    with pytest.raises(ValueError, match="needs a cls token"):
        ClassifierHead(2, 3, pool="cls")(Tokens(x))


def test_adapters_registry_and_errors():
    assert {"linear", "mlp"} <= set(list_adapters())
    lin = create_adapter("linear", 8, 16)
    assert lin.proj.bias is None and lin.in_dim == 8 and lin.out_dim == 16
    t = Tokens(torch.randn(2, 5, 8), grid=(5,))
    out = create_adapter("mlp", 8, 16, depth=3, hidden_dim=32)(t)
    assert out.x.shape == (2, 5, 16) and out.grid == (5,)
    with pytest.raises(ValueError, match="unknown adapter 'qformerz'"):
        create_adapter("qformerz", 8, 8)
    with pytest.raises(ValueError, match=r"expects \[B, N, 8\]"):
        lin(torch.randn(2, 5, 9))
    with pytest.raises(TypeError, match="adapter 'linear'"):
        create_adapter("linear", 8, 8, depth=2)
