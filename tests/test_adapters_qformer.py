"""`qformer` adapter: BLIP-2's Q-Former against `transformers.Blip2QFormerModel` (the oracle) on tiny random configs."""

from __future__ import annotations

import pytest
import torch
from transformers import Blip2QFormerConfig, Blip2QFormerModel
from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

import adapters.qformer  # noqa: F401  (registers "qformer")
from adapters import create_adapter, list_adapters
from adapters.qformer import QFormer
from tokenizers_mm import Tokens

B, N, Q, ENC, HID = 3, 10, 6, 24, 32
ATOL = 1e-5


def hf_qformer(freq: int = 2, attn: str = "sdpa", text: bool = False, layers: int = 3) -> Blip2QFormerModel:
    """A tiny HF Q-Former with every weight random (biases and LayerNorms too, so the mapping of each is checked)."""
    config = Blip2QFormerConfig(
        hidden_size=HID,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=48,
        encoder_hidden_size=ENC,
        cross_attention_frequency=freq,
        use_qformer_text_input=text,
        vocab_size=50,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    model = Blip2QFormerModel._from_config(config, attn_implementation=attn).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "layernorm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2 if p.dim() > 1 else 0.1)
    return model


def query_tokens() -> torch.Tensor:
    return torch.randn(1, Q, HID, generator=torch.Generator().manual_seed(1))


def encoder_tokens(n: int = N, batch: int = B, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch, n, ENC, generator=torch.Generator().manual_seed(seed))


def padding_mask(n: int = N) -> torch.Tensor:
    lengths = torch.tensor([n, n - 3, 1])
    return torch.arange(n)[None] < lengths[:, None]


def hf_forward(model, queries, x, enc_mask=None, **kw) -> torch.Tensor:
    out = model(query_embeds=queries.expand(x.shape[0], -1, -1), encoder_hidden_states=x, **kw)
    return out.last_hidden_state


# ---------------------------------------------------------------------------------------------------- the oracle
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("freq", [1, 2])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_hf_blip2_qformer(attn: str, freq: int, masked: bool) -> None:
    hf = hf_qformer(freq, attn)
    qt = query_tokens()
    ours = QFormer.from_hf(hf, qt).eval()
    assert sum(layer.cross_attn is not None for layer in ours.layers) == (3 if freq == 1 else 2)
    x = encoder_tokens()
    mask = padding_mask() if masked else None
    with torch.no_grad():
        ref = hf(
            query_embeds=qt.expand(B, -1, -1),
            encoder_hidden_states=x,
            encoder_attention_mask=mask.long() if masked else None,
        ).last_hidden_state
        got = ours(Tokens(x, mask=mask, modality="image"))
    assert got.x.shape == (B, Q, HID)
    torch.testing.assert_close(got.x, ref, atol=ATOL, rtol=0)


def hf_encoder_mask_4d(mask: torch.Tensor, attn: str) -> torch.Tensor:
    """HF turns a 2-D encoder mask into [B, 1, Q + T, N] when text is present, which breaks its cross-attention over
    the Q query positions; a ready [B, 1, 1, N] mask (passed through as is) is how HF runs text + padded images."""
    m = mask[:, None, None, :]
    return m if attn == "sdpa" else (~m).float() * torch.finfo(torch.float32).min


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_text_path_matches_hf(attn: str) -> None:
    hf = hf_qformer(2, attn, text=True)
    qt = query_tokens()
    torch.manual_seed(3)
    emb = Blip2TextEmbeddings(hf.config).eval()
    ours = QFormer.from_hf(hf, qt, text_embeddings=emb).eval()
    x, mask = encoder_tokens(), padding_mask()
    ids = torch.randint(1, 50, (B, 5), generator=torch.Generator().manual_seed(4))
    text_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    with torch.no_grad():
        ref = hf(
            query_embeds=emb(input_ids=ids, query_embeds=qt.expand(B, -1, -1)),
            query_length=Q,
            attention_mask=torch.cat([torch.ones(B, Q, dtype=torch.long), text_mask], 1),
            encoder_hidden_states=x,
            encoder_attention_mask=hf_encoder_mask_4d(mask, attn),
        ).last_hidden_state
        full = ours.forward_hidden(x, mask, input_ids=ids, text_mask=text_mask)
        queries = ours(Tokens(x, mask=mask), input_ids=ids, text_mask=text_mask)
        from_embeds = ours(x, mask, text_embeds=emb(input_ids=ids), text_mask=text_mask.bool())
    assert full.shape == (B, Q + 5, HID)
    torch.testing.assert_close(full, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(queries.x, ref[:, :Q], atol=ATOL, rtol=0)
    torch.testing.assert_close(from_embeds, ref[:, :Q], atol=ATOL, rtol=0)
    # text-path weights present but no text given: the plain query path, as HF with query_embeds = queries only
    with torch.no_grad():
        ref_q = hf(query_embeds=qt.expand(B, -1, -1), encoder_hidden_states=x).last_hidden_state
        torch.testing.assert_close(ours(x), ref_q, atol=ATOL, rtol=0)


def test_from_state_dict_and_config() -> None:
    hf = hf_qformer(2)
    qt = query_tokens()
    x = encoder_tokens()
    with torch.no_grad():
        ref = hf_forward(hf, qt, x)
        a = QFormer.from_hf(hf.state_dict(), qt[0], config=hf.config).eval()  # [Q, H] queries work too
        prefixed = {f"qformer.{k}": v for k, v in hf.state_dict().items()} | {"query_tokens": qt}
        b = QFormer.from_hf(prefixed, qt, config=hf.config.to_dict()).eval()
        torch.testing.assert_close(a(x), ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(b(x), ref, atol=ATOL, rtol=0)
    c = QFormer.from_hf(hf, qt, out_dim=20)
    assert (c.in_dim, c.out_dim, c.num_queries) == (ENC, 20, Q)
    assert c(x).shape == (B, Q, 20)


# ---------------------------------------------------------------------------------------------------- behaviour
def small(**kw) -> QFormer:
    torch.manual_seed(0)
    kw = dict(num_queries=Q, hidden_size=HID, num_layers=2, num_heads=4, intermediate_size=48) | kw
    return QFormer(ENC, 40, **kw).eval()


def test_output_count_independent_of_input_length() -> None:
    model = small()
    for n in (1, 7, 50):
        assert model(encoder_tokens(n)).shape == (B, Q, 40)
        assert model.num_output_tokens(n) == Q
    assert model.changes_token_count is True


def test_padding_never_changes_the_output() -> None:
    model = small()
    x = encoder_tokens()
    with torch.no_grad():
        base = model(x)
        torch.testing.assert_close(model(x, torch.ones(B, N, dtype=torch.bool)), base, atol=1e-6, rtol=0)
        # extra padded tokens (garbage values) at the end
        padded = torch.cat([x, 100 * encoder_tokens(7, seed=9)], dim=1)
        mask = torch.arange(N + 7)[None].expand(B, -1) < N
        torch.testing.assert_close(model(Tokens(padded, mask=mask)).x, base, atol=1e-6, rtol=0)
        # padding scattered inside, variable length per sample: equals each sample run alone on its real tokens
        mask = torch.rand(B, N, generator=torch.Generator().manual_seed(5)) > 0.4
        mask[:, 0] = True
        out = model(x, mask)
        for i in range(B):
            alone = model(x[i : i + 1, mask[i]])
            torch.testing.assert_close(out[i : i + 1], alone, atol=1e-6, rtol=0)
        # a sample without any real token stays finite (attends to all its tokens, as if unmasked)
        empty = torch.ones(B, N, dtype=torch.bool)
        empty[1] = False
        out = model(x, empty)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, base, atol=1e-6, rtol=0)


def test_tokens_metadata() -> None:
    model = small()
    x = encoder_tokens(5)
    tokens = Tokens(
        x, mask=torch.ones(B, 5, dtype=torch.bool), pos=torch.rand(B, 5, 2), grid=(2, 2), num_prefix=1, modality="audio"
    )
    out = model(tokens)
    assert isinstance(out, Tokens)
    assert out.x.shape == (B, Q, 40)
    assert out.mask is None and out.grid == (Q,) and out.num_prefix == 0 and out.num_suffix == 0
    assert out.modality == "audio"
    assert out.pos.shape == (B, Q, 1) and out.pos.dtype == torch.float32
    assert torch.equal(out.pos[1, :, 0], torch.arange(Q, dtype=torch.float32))
    assert isinstance(model(x), torch.Tensor)  # tensor in -> tensor out


def test_create_adapter_and_defaults() -> None:
    assert "qformer" in list_adapters()
    model = create_adapter("qformer", ENC, 40, num_queries=4, hidden_size=HID, num_layers=2, num_heads=4)
    assert isinstance(model, QFormer)
    assert (model.in_dim, model.out_dim, model.num_queries) == (ENC, 40, 4)
    assert model(encoder_tokens()).shape == (B, 4, 40)
    with torch.device("meta"):
        default = create_adapter("qformer", 1408, 4096)
    assert (default.num_queries, default.hidden_size, default.num_layers, default.num_heads) == (32, 768, 6, 12)
    assert [layer.cross_attn is not None for layer in default.layers] == [True, False] * 3
    assert default.layers[0].ffn_query.fc1.out_features == 3072
    assert default.layers[0].ffn_text is None
    assert tuple(default.layers[0].cross_attn.kv.weight.shape) == (2 * 768, 1408)
    assert "num_queries=32" in repr(default)


def test_errors() -> None:
    model = small()
    with pytest.raises(ValueError, match=rf"expects \[B, N, {ENC}\] tokens, got \(3, 10, 25\)"):
        model(torch.randn(B, N, ENC + 1))
    with pytest.raises(ValueError, match=r"encoder mask must be \[B, N\] = \[3, 10\], got \(3, 11\)"):
        model(encoder_tokens(), torch.ones(B, N + 1, dtype=torch.bool))
    with pytest.raises(TypeError, match="must be bool"):
        model(encoder_tokens(), torch.ones(B, N))
    with pytest.raises(ValueError, match=r"inside Tokens\.mask"):
        model(Tokens(encoder_tokens()), torch.ones(B, N, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one input token"):
        model(torch.randn(B, 0, ENC))
    with pytest.raises(ValueError, match="text_input=True"):
        model(encoder_tokens(), text_embeds=torch.randn(B, 4, HID))
    with pytest.raises(ValueError, match="vocab_size"):
        small(text_input=True)(encoder_tokens(), input_ids=torch.ones(B, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"text_embeds must be \[B, T, hidden_size\]"):
        small(text_input=True)(encoder_tokens(), text_embeds=torch.randn(B, 4, HID + 1))
    with pytest.raises(ValueError, match=r"text_mask must be \[B, N\] = \[3, 4\]"):
        small(text_input=True)(encoder_tokens(), text_embeds=torch.randn(B, 4, HID), text_mask=torch.ones(B, 5))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        QFormer(ENC, 40, hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="activation"):
        QFormer(ENC, 40, hidden_size=HID, num_heads=4, num_layers=1, activation="nope")
    with pytest.raises(TypeError, match="adapter 'qformer'"):
        create_adapter("qformer", ENC, 40, no_such_option=1)
    hf, qt = hf_qformer(2), query_tokens()
    with pytest.raises(ValueError, match="needs its Blip2QFormerConfig"):
        QFormer.from_hf(hf.state_dict(), qt)
    with pytest.raises(ValueError, match=rf"query_tokens must be \[1, Q, {HID}\]"):
        QFormer.from_hf(hf, torch.randn(1, Q, HID + 1))
    wrong = hf_qformer(1).config  # every layer would need cross-attention weights the state dict lacks
    with pytest.raises(ValueError, match="crossattention"):
        QFormer.from_hf(hf.state_dict(), qt, config=wrong)
    with pytest.raises(ValueError, match="not used"):
        QFormer.from_hf(hf_qformer(1).state_dict(), qt, config=hf.config)


@pytest.mark.parametrize("attention_dropout", [0.0, 0.1])  # folded value bias / plain path
def test_gradients_flow_to_queries_and_weights(attention_dropout: float) -> None:
    model = small(dropout=0.0, attention_dropout=attention_dropout).train()
    x = encoder_tokens().requires_grad_(True)
    model(Tokens(x, mask=padding_mask())).x.square().mean().backward()
    for name in ("query_tokens", "layers.0.cross_attn.kv.weight", "layers.0.cross_attn.kv.bias", "proj.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all(), name
    assert model.query_tokens.grad.abs().sum() > 0
    assert model.layers[0].cross_attn.kv.weight.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0
    assert x.grad[2, 1:].abs().max() == 0  # padded encoder tokens get no gradient


def test_train_mode_with_attention_dropout_takes_the_plain_path() -> None:
    """With attention dropout in training the value bias is not folded; a vanishing dropout gives the eval output."""
    hf, qt = hf_qformer(2), query_tokens()
    ours = QFormer.from_hf(hf, qt).eval()
    x, mask = encoder_tokens(), padding_mask()
    with torch.no_grad():
        ref = ours(x, mask)
        ours.train()
        ours.dropout.p = 0.0
        for m in ours.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
            if hasattr(m, "attn_dropout"):
                m.attn_dropout = 1e-12
        torch.testing.assert_close(ours(x, mask), ref, atol=ATOL, rtol=0)


def test_dtype_follows_the_qformer() -> None:
    model = small().to(torch.bfloat16)
    out = model(Tokens(encoder_tokens()))
    assert out.x.dtype == torch.bfloat16 and torch.isfinite(out.x.float()).all()
