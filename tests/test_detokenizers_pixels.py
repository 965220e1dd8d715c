"""`pixels` (MAE decoder), `patchify` / `unpatchify` and MAE masking against HF ``ViTMAEForPreTraining``."""

from __future__ import annotations

import pytest
import torch
from transformers import ViTMAEConfig, ViTMAEForPreTraining

from tokenizers_mm import Tokens, create_detokenizer, list_detokenizers
from tokenizers_mm.detokenizers import PixelDecoder, keep_tokens, mae_sincos_2d, psnr, random_masking
from tokenizers_mm.image import ImagePatches, patchify, unpatchify


def tiny_mae(image_size: int = 16, patch_size: int = 4, channels: int = 3, norm_pix: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    cfg = ViTMAEConfig(
        image_size=image_size,
        patch_size=patch_size,
        num_channels=channels,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        decoder_hidden_size=24,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=4,
        decoder_intermediate_size=48,
        mask_ratio=0.75,
        norm_pix_loss=norm_pix,
        attn_implementation="eager",
    )
    model = ViTMAEForPreTraining(cfg).eval()
    # transformers 5.25 leaves both fixed sin-cos tables at zero when a model is built from a config (only a loaded
    # checkpoint has them); build them as HF's own initialisers do
    model.vit.embeddings.initialize_weights()
    model.decoder.initialize_weights(model.vit.embeddings.patch_embeddings.num_patches)
    # HF initialises the decoder's biases and norms to 0 / 1: randomise them so the copy is really tested
    with torch.no_grad():
        for name, p in model.decoder.named_parameters():
            if "pos_embed" not in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("p", [2, 4, 16])
@pytest.mark.parametrize("channels", [1, 3])
def test_patchify_unpatchify_equal_hf_vit_mae(p, channels):
    size = 32 if p < 16 else 64
    model = tiny_mae(size, p, channels)
    images = torch.randn(2, channels, size, size)
    ours = patchify(images, p)
    assert torch.equal(ours, model.patchify(images))
    grid = (size // p, size // p)
    assert torch.equal(unpatchify(ours, p, grid), model.unpatchify(model.patchify(images)))
    assert torch.equal(unpatchify(ours, p, grid), images)


def test_patchify_non_square_round_trips_and_errors():
    images = torch.randn(2, 3, 8, 12)
    patches = patchify(images, 4)
    assert patches.shape == (2, 6, 48)
    assert torch.equal(unpatchify(patches, 4, (2, 3)), images)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        patchify(images, 5)
    with pytest.raises(ValueError, match="do not fill the grid"):
        unpatchify(patches, 4, (3, 3))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        patchify(images[0], 4)


def test_sincos_table_equals_hf_decoder_table():
    model = tiny_mae(32, 4)
    hf = model.decoder.decoder_pos_embed[0]  # [1 + L, D], the cls row zero
    ours = mae_sincos_2d((8, 8), hf.shape[-1])
    assert torch.allclose(ours, hf[1:], atol=1e-6)
    assert torch.count_nonzero(hf[0]) == 0


def test_random_masking_equals_hf():
    model = tiny_mae(16, 4)
    torch.manual_seed(1)
    noise = torch.rand(3, 16)
    seq = torch.randn(3, 16, 5)
    hf_seq, hf_mask, hf_restore = model.vit.embeddings.random_masking(seq, noise=noise)
    m = random_masking(3, 16, 0.75, noise=noise)
    assert torch.equal(m.ids_restore, hf_restore)
    assert torch.equal(m.mask, hf_mask)
    assert m.num_keep == 4 and int(m.mask.sum()) == 3 * 12
    kept = torch.gather(seq, 1, m.ids_keep.unsqueeze(-1).expand(-1, -1, 5))
    assert torch.equal(kept, hf_seq)


def test_random_masking_generator_is_deterministic_and_checks():
    a = random_masking(2, 10, 0.5, generator=torch.Generator().manual_seed(3))
    b = random_masking(2, 10, 0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.ids_keep, b.ids_keep)
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
        random_masking(2, 10, 1.0)
    with pytest.raises(ValueError, match="noise must be"):
        random_masking(2, 10, 0.5, noise=torch.rand(2, 9))


def test_keep_tokens_keeps_special_tokens_and_positions():
    tok = ImagePatches(img_size=16, patch_size=4, embed_dim=8, num_registers=1)
    tokens = tok(torch.randn(2, 3, 16, 16))
    m = random_masking(2, 16, 0.75, generator=torch.Generator().manual_seed(0))
    vis = keep_tokens(tokens, m.ids_keep)
    assert vis.num_tokens == 2 + 4 and vis.num_prefix == 2 and vis.grid is None
    assert torch.equal(vis.x[:, :2], tokens.x[:, :2])
    for b in range(2):
        assert torch.equal(vis.x[b, 2:], tokens.x[b, 2 + m.ids_keep[b]])
        assert torch.equal(vis.pos[b, 2:], tokens.pos[b, 2 + m.ids_keep[b]])
    with pytest.raises(ValueError, match="indexes 16 grid tokens"):
        keep_tokens(tokens, torch.full((2, 3), 16))


@pytest.mark.parametrize("norm_pix", [False, True])
def test_decoder_predictions_and_loss_equal_hf(norm_pix):
    """HF's encoder output (cls + visible tokens) through our decoder with copied weights = HF's logits and loss."""
    model = tiny_mae(32, 4, norm_pix=norm_pix)
    torch.manual_seed(2)
    images = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 64)
    with torch.no_grad():
        out = model(pixel_values=images, noise=noise)
        latent = model.vit(images, noise=noise).last_hidden_state
        dec = PixelDecoder.from_hf_vit_mae(model.decoder).eval()
        m = random_masking(2, 64, 0.75, noise=noise)
        assert torch.equal(m.ids_restore, out.ids_restore)
        pred = dec(Tokens(x=latent, num_prefix=1, modality="image"), m.ids_restore)
        loss = dec.loss(images, pred, m.mask)
    assert pred.shape == out.logits.shape == (2, 64, 48)
    torch.testing.assert_close(pred, out.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, out.loss, atol=1e-6, rtol=1e-5)


def test_from_hf_refuses_a_decoder_without_the_mae_table():
    model = tiny_mae(16, 4)
    with torch.no_grad():
        model.decoder.decoder_pos_embed.zero_()
    with pytest.raises(ValueError, match="sin-cos"):
        PixelDecoder.from_hf_vit_mae(model.decoder)


def test_decoder_mutation_mask_token_matters():
    """A copied decoder with a different mask token no longer matches: the hidden positions really use it."""
    model = tiny_mae(16, 4)
    images, noise = torch.randn(1, 3, 16, 16), torch.rand(1, 16)
    with torch.no_grad():
        out = model(pixel_values=images, noise=noise)
        latent = model.vit(images, noise=noise).last_hidden_state
        dec = PixelDecoder.from_hf_vit_mae(model.decoder).eval()
        dec.mask_token.add_(torch.randn_like(dec.mask_token))  # (a uniform shift would vanish in LayerNorm)
        pred = dec(Tokens(x=latent, num_prefix=1), out.ids_restore)
    hidden = out.mask[0].bool()
    assert not torch.allclose(pred[0, hidden], out.logits[0, hidden], atol=1e-3)


def test_registered_and_full_grid_decoding():
    assert "pixels" in list_detokenizers()
    dec = create_detokenizer("pixels", in_dim=8, patch_size=4, img_size=16, decoder_dim=16, depth=1, num_heads=2)
    tok = ImagePatches(img_size=16, patch_size=4, embed_dim=8)
    tokens = tok(torch.randn(2, 3, 16, 16))
    pred = dec(tokens)  # no masking: the whole grid, grid taken from tokens
    assert pred.shape == (2, 16, 48)
    images = torch.rand(2, 3, 16, 16)
    out = dec.render(pred, images=images)
    assert out.shape == images.shape
    with pytest.raises(ValueError, match="width 8"):
        dec(Tokens(x=torch.randn(2, 16, 4), grid=(4, 4)))
    with pytest.raises(ValueError, match="must fill the grid"):
        dec(Tokens(x=torch.randn(2, 5, 8)))
    with pytest.raises(ValueError, match="needs images="):
        dec.render(pred)


def test_render_inverts_normalised_target_and_pastes_visible():
    dec = PixelDecoder(in_dim=8, patch_size=4, img_size=8, decoder_dim=8, depth=1, num_heads=2, norm_pix_loss=True)
    images = torch.rand(2, 3, 8, 8)
    perfect = dec.target(images)
    torch.testing.assert_close(dec.render(perfect, images=images), images, atol=1e-5, rtol=1e-5)
    assert dec.loss(images, perfect).item() < 1e-10
    hidden = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0]], dtype=torch.float32)
    out = dec.render(torch.zeros_like(perfect), images=images, hidden=hidden)
    vis = patchify(out, 4)[~hidden.bool()]
    assert torch.equal(vis, patchify(images, 4)[~hidden.bool()])


def test_psnr():
    a = torch.rand(2, 1, 4, 4)
    assert torch.isclose(psnr(a, a + 0.1), torch.tensor(20.0)).all()
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(a, a[:1])


def test_mae_trains_on_real_digits():
    """A tiny MAE (our tokenizer + 1 timm block + our decoder) learns real 8x8 scikit-learn digits at 75% masking:
    the hidden-patch loss falls below that of predicting each patch's mean (norm_pix: the loss of zeros, 1.0)."""
    from sklearn.datasets import load_digits
    from timm.models.vision_transformer import Block

    torch.manual_seed(0)
    images = torch.tensor(load_digits().images[:512], dtype=torch.float32).div(16).unsqueeze(1)  # [512, 1, 8, 8]
    tok = ImagePatches(img_size=8, patch_size=2, in_chans=1, embed_dim=32, pos_embed="sincos")
    enc = Block(32, 4)
    dec = PixelDecoder(in_dim=32, patch_size=2, in_chans=1, img_size=8, decoder_dim=32, depth=1, num_heads=4)
    params = [*tok.parameters(), *enc.parameters(), *dec.parameters()]
    opt = torch.optim.AdamW(params, lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(80):
        batch = images[torch.randint(0, 512, (32,), generator=gen)]
        m = random_masking(32, 16, 0.75, generator=gen)
        vis = keep_tokens(tok(batch), m.ids_keep)
        vis = vis.with_x(enc(vis.x))
        loss = dec.loss(batch, dec(vis, m.ids_restore), m.mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # predicting each patch's own mean (zeros in normalised pixels) scores 1.0; the run ends near 0.46 from 0.92
    assert sum(losses[-20:]) / 20 < 0.7 < sum(losses[:5]) / 5
