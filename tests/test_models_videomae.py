"""VideoMAE backbone (`mmblocks.models.videomae`), checked against Hugging Face's `VideoMAEModel` as the oracle."""

from __future__ import annotations

import re

import pytest
import torch
from oracles import randomize
from timm.models.vision_transformer import Block
from torch import nn
from transformers import VideoMAEConfig, VideoMAEForPreTraining, VideoMAEForVideoClassification, VideoMAEModel

from adapters import create_adapter
from mmblocks.heads import ClassifierHead
from mmblocks.llm import load_blocks
from mmblocks.models import (
    VIDEOMAE_PRESETS,
    LLMStage,
    MMEncoder,
    TimmViT,
    videomae_backbone,
    videomae_from_hf,
)
from tokenizers_mm import Tokens, VideoTubelets

TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    image_size=32,
    patch_size=16,
    num_frames=8,
    tubelet_size=2,
    decoder_hidden_size=32,
    decoder_num_hidden_layers=1,
    decoder_num_attention_heads=2,
    decoder_intermediate_size=64,
)  # grid (4, 2, 2): 16 tokens


def _hf_videomae(attn: str = "sdpa", cls=VideoMAEModel, **overrides) -> nn.Module:
    torch.manual_seed(0)
    config = VideoMAEConfig(**{**TINY, **overrides})
    config._attn_implementation = attn
    return randomize(cls(config)).eval()


def _clip(b: int = 2, t: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, t, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _old_bias(m: re.Match) -> str:
    return f"attention.attention.{m.group(1)[0]}_bias"


def _base(model: nn.Module) -> nn.Module:
    return getattr(model, "videomae", model)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize(
    "cls, mean_pooling, as_state_dict",
    [
        (VideoMAEModel, False, False),
        (VideoMAEModel, True, False),
        (VideoMAEForVideoClassification, True, True),
        (VideoMAEForPreTraining, False, False),
    ],
)
def test_videomae_from_hf_equals_hf_last_hidden_state(attn, cls, mean_pooling, as_state_dict):
    """Tubelets + timm blocks (zero k bias) [+ final norm] == `VideoMAEModel(frames).last_hidden_state` (<= 1e-5).

    ``use_mean_pooling=True`` (HF's default): HF's last hidden state is un-normed and our backbone's norm is the
    identity; False: HF's `layernorm` is our final norm."""
    hf = _hf_videomae(attn, cls, use_mean_pooling=mean_pooling, num_labels=3)
    if as_state_dict:  # transformers-4 layout: q / v biases as `q_bias` / `v_bias` parameters
        sd = {re.sub(r"attention\.attention\.(query|value)\.bias", _old_bias, k): v for k, v in hf.state_dict().items()}
        assert sum(k.endswith((".q_bias", ".v_bias")) for k in sd) == 4
        tok, bb = videomae_from_hf(sd, hf.config)
    else:
        tok, bb = videomae_from_hf(hf)
    assert isinstance(tok, VideoTubelets) and isinstance(bb, TimmViT)
    assert all(isinstance(b, Block) for b in bb.blocks) and bb.blocks[0].norm1.eps == 1e-12
    assert isinstance(bb.norm, nn.Identity) == mean_pooling
    bias = bb.blocks[1].attn.qkv.bias
    assert bool((bias[64:128] == 0).all()) and bool((bias[:64] != 0).any()) and bool((bias[128:] != 0).any())
    enc = MMEncoder(tok, bb).eval()
    x = _clip()
    with torch.no_grad():
        ref = _base(hf)(x).last_hidden_state
        out = enc.forward_features(x)
    assert out.grid == (4, 2, 2) and out.num_prefix == 0 and out.x.shape == ref.shape == (2, 16, 64)
    assert (out.x - ref).abs().max().item() <= 1e-5


def test_videomae_without_qv_bias():
    hf = _hf_videomae("sdpa", qv_bias=False, use_mean_pooling=False)
    tok, bb = videomae_from_hf(hf)
    assert bb.blocks[0].attn.qkv.bias is None
    x = _clip()
    with torch.no_grad():
        diff = (MMEncoder(tok, bb).eval().forward_features(x).x - hf(x).last_hidden_state).abs().max().item()
    assert diff <= 1e-5


def test_videomae_padded_batch_equals_hf_on_real_tubelets():
    """A frame mask hides the padded tubelets: each clip's real tokens equal HF run on that clip's real tubelets
    only (`bool_masked_pos` drops the others)."""
    hf = _hf_videomae("sdpa", use_mean_pooling=False)
    enc = MMEncoder(*videomae_from_hf(hf)).eval()
    lengths = [8, 5, 2]  # tubelets along t: 4, 3 (the last one half padding), 1
    frame_mask = torch.arange(8) < torch.tensor(lengths).unsqueeze(1)
    x = _clip(3) * frame_mask[:, :, None, None, None]
    with torch.no_grad():
        out = enc.forward_features(x, mask=frame_mask)
        assert out.mask.sum(1).tolist() == [16, 12, 4]
        for i in range(3):
            real = out.mask[i : i + 1]
            ref = hf(x[i : i + 1], bool_masked_pos=~real).last_hidden_state[0]
            assert (out.x[i, real[0]] - ref).abs().max().item() <= 1e-5
        # the check has teeth: HF on the whole padded clip differs on the real tokens
        whole = hf(x[2:3]).last_hidden_state[0]
        assert (whole[out.mask[2]] - out.x[2, out.mask[2]]).abs().max().item() > 1e-3


class _RealTokensOnly(nn.Module):
    """Reference tokenizer: one clip's tokens with the padded ones dropped."""

    def __init__(self, tokenizer: nn.Module):
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, inputs: torch.Tensor, mask: torch.Tensor) -> Tokens:
        t = self.tokenizer(inputs, mask=mask)
        assert t.batch_size == 1
        return Tokens(t.x[:, t.mask[0]], modality=t.modality)


def test_videomae_with_llm_stage_padding_and_gradients(tiny_checkpoint):
    """VideoMAE -> linear -> frozen LLM block -> linear -> mean-pool head: padded frames change no clip's logits;
    the frozen block gets no gradient, the tubelet conv and the VideoMAE blocks do."""
    tok, bb = videomae_from_hf(_hf_videomae("sdpa", use_mean_pooling=False))
    torch.manual_seed(0)
    stage = LLMStage(
        create_adapter("linear", 64, 64),
        load_blocks(tiny_checkpoint("llama"), [-1]),
        create_adapter("linear", 64, 64),
    )
    head = ClassifierHead(64, 4, pool="mean")
    enc = MMEncoder(tok, bb, stage, head, insert_at=1).eval()
    ref_enc = MMEncoder(_RealTokensOnly(tok), bb, stage, head, insert_at=1).eval()
    frame_mask = torch.tensor([[True] * 8, [True] * 4 + [False] * 4])
    x = _clip(2) * frame_mask[:, :, None, None, None]
    with torch.no_grad():
        logits = enc(x, mask=frame_mask)
        for i in range(2):
            ref = ref_enc(x[i : i + 1], mask=frame_mask[i : i + 1])
            assert (logits[i] - ref[0]).abs().max().item() <= 1e-5
    assert enc.layer_names() == ["block.0", "llm", "block.1"]
    enc.train()
    torch.nn.functional.cross_entropy(enc(x, mask=frame_mask), torch.tensor([1, 3])).backward()
    assert all(p.grad is None for p in stage.blocks.parameters())
    assert tok.proj.weight.grad.abs().sum() > 0 and bb.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert stage.adapter_out.proj.weight.grad.abs().sum() > 0


def test_videomae_backbone_from_scratch():
    tok, bb = videomae_backbone(embed_dim=32, depth=2, num_heads=2, img_size=32, num_frames=4)
    assert isinstance(tok, VideoTubelets) and bb.depth == 2 and not isinstance(bb.norm, nn.Identity)
    out = MMEncoder(tok, bb).eval().forward_features(torch.randn(2, 4, 3, 32, 32))
    assert out.x.shape == (2, 2 * 2 * 2, 32) and out.grid == (2, 2, 2) and torch.isfinite(out.x).all()
    _, small = videomae_backbone("videomae_small", img_size=32, num_frames=4, final_norm=False)
    assert (small.embed_dim, small.depth, small.blocks[0].attn.num_heads) == tuple(
        VIDEOMAE_PRESETS["videomae_small"].values()
    )
    assert isinstance(small.norm, nn.Identity)
    with pytest.raises(ValueError, match="unknown VideoMAE preset"):
        videomae_backbone("videomae_tiny")


def test_videomae_from_hf_errors():
    hf = _hf_videomae("sdpa")
    with pytest.raises(ValueError, match="needs its HF config"):
        videomae_from_hf(hf.state_dict())
    with pytest.raises(ValueError, match="num_hidden_layers=4"):
        videomae_from_hf(hf.state_dict(), VideoMAEConfig(**{**TINY, "num_hidden_layers": 4}))
    with pytest.raises(ValueError, match="only square patches"):
        videomae_from_hf(hf.state_dict(), VideoMAEConfig(**{**TINY, "patch_size": (16, 8)}))
