"""AST backbone (`mmblocks.models.ast`), checked against Hugging Face's `ASTModel` as the oracle."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import Block
from torch import nn
from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification, ASTModel

from adapters import create_adapter
from mmblocks.heads import ClassifierHead
from mmblocks.llm import load_blocks
from mmblocks.models import AST_PRESETS, LLMStage, MMEncoder, TimmViT, ast_backbone, ast_from_hf
from tokenizers_mm import AudioPatches, Tokens

TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    num_mel_bins=128,
    max_length=128,
)  # grid (12, 12): 2 + 144 tokens


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random (HF zero-inits cls / distillation / positions and biases, hiding mapping errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "layernorm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_((0.2 if p.dim() > 1 else 0.1) * noise)
    return model.eval()


def _hf_ast(attn: str = "sdpa", cls=ASTModel, **overrides) -> nn.Module:
    torch.manual_seed(0)
    config = ASTConfig(**{**TINY, **overrides})
    config._attn_implementation = attn
    return _randomize(cls(config))


def _fbank(b: int = 2, t: int = 128, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, t, 128, generator=torch.Generator().manual_seed(seed))


def _old_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers-4 key names (`encoder.layer.i.attention.attention.query`, ...), as older checkpoints hold."""
    renames = [
        ("layers.", "encoder.layer."),
        ("attention.q_proj", "attention.attention.query"),
        ("attention.k_proj", "attention.attention.key"),
        ("attention.v_proj", "attention.attention.value"),
        ("attention.o_proj", "attention.output.dense"),
        ("mlp.fc1", "intermediate.dense"),
        ("mlp.fc2", "output.dense"),
    ]
    out = {}
    for key, value in state_dict.items():
        for a, b in renames:
            key = key.replace(a, b)
        out[key] = value
    return out


class _RealTokensOnly(nn.Module):
    """Reference tokenizer: one sample's tokens with the padded ones dropped (what padding must not change)."""

    def __init__(self, tokenizer: nn.Module):
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, inputs: torch.Tensor) -> Tokens:
        t = self.tokenizer(inputs)
        assert t.batch_size == 1
        return Tokens(t.x[:, t.mask[0]], num_prefix=t.num_prefix, modality=t.modality)


def _frame_mask(lengths: list[int], t: int) -> torch.Tensor:
    return torch.arange(t) < torch.tensor(lengths).unsqueeze(1)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("layout", ["model", "task_model", "old_state_dict"])
def test_ast_from_hf_equals_hf_last_hidden_state(attn, layout):
    """Our tokenizer + timm blocks + final norm == `ASTModel(input_values).last_hidden_state` (fp32, <= 1e-5)."""
    if layout == "model":
        hf = _hf_ast(attn)
        tok, bb = ast_from_hf(hf, normalize=False)
    else:
        task = _hf_ast(attn, cls=ASTForAudioClassification, num_labels=3)
        hf = task.audio_spectrogram_transformer
        if layout == "task_model":
            tok, bb = ast_from_hf(task, normalize=False)
        else:
            tok, bb = ast_from_hf(_old_layout(task.state_dict()), task.config, normalize=False)
    assert isinstance(tok, AudioPatches) and isinstance(bb, TimmViT)
    assert all(isinstance(b, Block) for b in bb.blocks) and bb.blocks[0].norm1.eps == 1e-12 and bb.norm.eps == 1e-12
    enc = MMEncoder(tok, bb).eval()
    x = _fbank()
    with torch.no_grad():
        ref = hf(x).last_hidden_state
        out = enc.forward_features(x)
    assert out.num_prefix == 2 and out.grid == (12, 12) and out.x.shape == ref.shape == (2, 146, 64)
    assert bool(out.mask.all()), "an fbank of max_length frames has no padding"
    assert (out.x - ref).abs().max().item() <= 1e-5


def test_ast_normalisation_and_padding_mask_equal_hf_feature_extractor():
    """Waveforms of two lengths: ours (AudioSet normalisation inside the tokenizer, padded columns masked) equals
    `ASTFeatureExtractor` -> `ASTModel(input_values, attention_mask=tokens.mask)`; with the fbank padded to
    max_length (as HF's extractor hands it over) ours equals HF's unmasked output."""
    hf = _hf_ast("sdpa")
    tok, bb = ast_from_hf(hf, subtract_waveform_mean=False)  # HF's extractor does not remove the waveform mean
    enc = MMEncoder(tok, bb).eval()
    g = torch.Generator().manual_seed(2)
    lengths = [16000, 9000]  # 98 and 54 frames of 128: 10 and 6 real patch columns of 12
    wav = torch.zeros(2, 16000)
    for i, n in enumerate(lengths):
        wav[i, :n] = 0.1 * torch.randn(n, generator=g)
    fe = ASTFeatureExtractor(max_length=128)
    input_values = fe([w[:n].numpy() for w, n in zip(wav, lengths)], sampling_rate=16000, return_tensors="pt")[
        "input_values"
    ]
    mask = _frame_mask(lengths, 16000)
    with torch.no_grad():
        tokens = enc.tokenize(wav, mask=mask)
        assert tokens.mask.sum(1).tolist() == [2 + 12 * 10, 2 + 12 * 6]
        out = enc.forward_features(wav, mask=mask).x
        ref = hf(input_values, attention_mask=tokens.mask.long()).last_hidden_state
        assert (out - ref).abs().max().item() <= 1e-5
        raw = MMEncoder(*ast_from_hf(hf, normalize=False)).eval()
        unmasked = raw.forward_features(input_values).x
        assert (unmasked - hf(input_values).last_hidden_state).abs().max().item() <= 1e-5


def test_ast_padded_batch_real_tokens_unchanged():
    """A padded batch (frame mask) gives each clip's real tokens what the clip alone, padding dropped, gives."""
    tok, bb = ast_from_hf(_hf_ast("sdpa"), normalize=False)
    enc = MMEncoder(tok, bb).eval()
    ref_enc = MMEncoder(_RealTokensOnly(tok), bb).eval()
    lengths = [128, 75, 40]
    x = _fbank(3, 128) * _frame_mask(lengths, 128).unsqueeze(-1)
    with torch.no_grad():
        out = enc.forward_features(x, mask=_frame_mask(lengths, 128))
        for i, n in enumerate(lengths):
            real = out.mask[i]
            ref = ref_enc.forward_features(x[i : i + 1, :n]).x[0]
            assert real.sum().item() == ref.shape[0]
            assert (out.x[i, real] - ref).abs().max().item() <= 1e-5
        # the check has teeth: without the attention mask the padded columns change the real tokens
        t = enc.tokenize(x, mask=_frame_mask(lengths, 128))
        h = t.x
        for blk in bb.blocks:
            h = blk(h)
        assert (bb.norm(h)[2, out.mask[2]] - out.x[2, out.mask[2]]).abs().max().item() > 1e-3


@pytest.mark.parametrize("insert_at", [None, 1])
def test_ast_with_llm_stage_padding_and_gradients(tiny_checkpoint, insert_at):
    """AST -> linear -> frozen LLM block -> linear -> norm -> mean-pool head: padding changes no clip's logits, the
    frozen block gets no gradient, tokenizer / AST blocks / adapters do."""
    tok, bb = ast_from_hf(_hf_ast("sdpa"), normalize=False)
    torch.manual_seed(0)
    stage = LLMStage(
        create_adapter("linear", 64, 64),
        load_blocks(tiny_checkpoint("llama"), [-1]),
        create_adapter("linear", 64, 64),
    )
    head = ClassifierHead(64, 3, pool="mean")
    enc = MMEncoder(tok, bb, stage, head, insert_at=insert_at).eval()
    ref_enc = MMEncoder(_RealTokensOnly(tok), bb, stage, head, insert_at=insert_at).eval()
    lengths = [128, 60]
    mask = _frame_mask(lengths, 128)
    x = _fbank(2, 128) * mask.unsqueeze(-1)
    with torch.no_grad():
        logits = enc(x, mask=mask)
        feats = enc.forward_features(x, mask=mask)
        for i, n in enumerate(lengths):
            ref_feats = ref_enc.forward_features(x[i : i + 1, :n]).x[0]
            assert (feats.x[i, feats.mask[i]] - ref_feats).abs().max().item() <= 1e-5
            assert (logits[i] - ref_enc(x[i : i + 1, :n])[0]).abs().max().item() <= 1e-5
    assert logits.shape == (2, 3)
    enc.train()
    torch.nn.functional.cross_entropy(enc(x, mask=mask), torch.tensor([0, 2])).backward()
    assert all(p.grad is None for p in stage.blocks.parameters()), "the frozen LLM block gets no gradient"
    assert tok.proj.weight.grad.abs().sum() > 0 and tok.pos_embed.grad.abs().sum() > 0
    assert bb.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert stage.adapter_in.proj.weight.grad.abs().sum() > 0


def test_ast_backbone_from_scratch():
    tok, bb = ast_backbone(embed_dim=32, depth=2, num_heads=2, target_frames=64, tstride=16, fstride=16)
    assert tok.num_prefix_tokens == 2 and tok.grid_size == (8, 4) and bb.depth == 2 and bb.embed_dim == 32
    assert bb.blocks[0].norm1.eps == 1e-6 and bb.blocks[0].mlp.fc1.out_features == 128
    assert not any(n.startswith("_tokenizer") for n, _ in bb.named_parameters()), "no dead image patch embedding"
    out = MMEncoder(tok, bb).eval().forward_features(torch.randn(2, 16000))
    assert out.x.shape == (2, 2 + 8 * 4, 32) and torch.isfinite(out.x).all()
    tiny = ast_backbone("ast_tiny", target_frames=32)[1]
    assert (tiny.embed_dim, tiny.depth, tiny.blocks[0].attn.num_heads) == tuple(AST_PRESETS["ast_tiny"].values())
    with pytest.raises(ValueError, match="unknown AST preset 'ast_giant'"):
        ast_backbone("ast_giant")
    with pytest.raises(ValueError, match="multiple of num_heads"):
        ast_backbone(embed_dim=30, num_heads=4)


def test_ast_from_hf_errors():
    hf = _hf_ast("sdpa")
    with pytest.raises(ValueError, match="needs its HF config"):
        ast_from_hf(hf.state_dict())
    with pytest.raises(ValueError, match=r"hold layers \[0, 1\], the config says num_hidden_layers=3"):
        ast_from_hf(hf.state_dict(), ASTConfig(**{**TINY, "num_hidden_layers": 3}))
    with pytest.raises(TypeError, match="expected an HF model or a state dict"):
        ast_from_hf(42)
    with pytest.raises(ValueError, match="hidden_act 'gelu_10' is not supported"):
        ast_from_hf(hf.state_dict(), ASTConfig(**TINY, hidden_act="gelu_10"))
    sd = {k: v for k, v in hf.state_dict().items() if k != "embeddings.cls_token"}
    with pytest.raises(KeyError, match=r"the AST weights have no 'embeddings\.cls_token'"):
        ast_from_hf(sd, hf.config)
    sd = {k: v for k, v in hf.state_dict().items() if "layers.1.attention.k_proj.weight" not in k}
    with pytest.raises(KeyError, match=r"HF layer 1: no k\.weight"):
        ast_from_hf(sd, hf.config)
