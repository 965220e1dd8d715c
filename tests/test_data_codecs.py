"""The loader for points, audio and video shards: decoding, padding masks, bad samples, and padding-invariant models."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile
import torch
import torchaudio.functional as AF

from mmblocks.data import build_loader, write_shards
from mmblocks.data.codecs import AudioCodec, PointsCodec, pad_stack
from mmblocks.data.video_io import encode_video
from mmblocks.models import MMEncoder, TimmViT
from tokenizers_mm import create_tokenizer


def _flac(wave: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, wave, rate, format="FLAC")
    return buf.getvalue()


def _read(loader) -> list:
    return list(loader)


# ------------------------------------------------------------------------------------------------------ helpers


def test_pad_stack_masks_only_when_lengths_differ():
    same, mask = pad_stack([np.ones((3, 2)), np.zeros((3, 2))])
    assert same.shape == (2, 3, 2) and mask is None
    out, mask = pad_stack([np.ones((2, 2)), np.full((4, 2), 2.0)], np.float32)
    assert out.dtype == np.float32 and out.shape == (2, 4, 2)
    np.testing.assert_array_equal(mask, [[True, True, False, False], [True] * 4])
    assert (out[0, 2:] == 0).all() and (out[1] == 2).all()


# ------------------------------------------------------------------------------------------------------- points


@pytest.fixture(scope="module")
def point_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("points")
    rng = np.random.default_rng(0)
    clouds = [rng.normal(size=(40 + 8 * i, 3)).astype(np.float32) for i in range(6)]
    samples = [{"__key__": f"s{i}", "npy": c, "cls": i % 2} for i, c in enumerate(clouds)]
    samples.append({"__key__": "garbage", "npy": b"not a npy file", "cls": 0})
    nan = clouds[0].copy()
    nan[3, 1] = np.nan
    samples.append({"__key__": "nan", "npy": nan, "cls": 1})
    write_shards(samples, root, "test", modality="points", class_names=["a", "b"], progress=False)
    return root, clouds


def test_points_batches_are_padded_with_a_mask_and_keep_the_stored_values(point_shards):
    root, clouds = point_shards
    loader = build_loader(root, "test", batch_size=8, num_workers=0, shuffle=False)
    (batch,) = _read(loader)
    assert loader.modality == "points"
    assert batch.inputs.shape == (6, 80, 3) and batch.mask.shape == (6, 80)
    for i, cloud in enumerate(clouds):
        n = len(cloud)
        assert batch.mask[i].sum() == n and bool(batch.mask[i, :n].all())
        torch.testing.assert_close(batch.inputs[i, :n], torch.from_numpy(cloud), rtol=0, atol=0)
        assert (batch.inputs[i, n:] == 0).all()
    stats = loader.stats
    assert stats["corrupt"] == 2 and stats["samples"] == 6
    assert any("nan" in r and "non-finite" in r for r in stats["reasons"])
    assert any("garbage" in r for r in stats["reasons"])


def test_points_subset_is_fixed_in_eval_and_reseeded_in_training(point_shards):
    root, _ = point_shards
    eval_a = _read(build_loader(root, "test", batch_size=8, num_workers=0, shuffle=False, num_points=32))[0]
    eval_b = _read(build_loader(root, "test", batch_size=8, num_workers=0, shuffle=False, num_points=32, epoch=3))[0]
    assert eval_a.inputs.shape == (6, 32, 3) and eval_a.mask is None
    torch.testing.assert_close(eval_a.inputs, eval_b.inputs)

    def train(epoch):
        loader = build_loader(
            root, "test", batch_size=8, num_workers=0, shuffle=False, num_points=32, augment=True, epoch=epoch
        )
        return _read(loader)[0].inputs

    torch.testing.assert_close(train(0), train(0))  # seeded: reproducible
    assert not torch.equal(train(0), train(1))


def test_point_augment_presets_and_errors():
    xyz = np.random.default_rng(1).normal(size=(100, 3)).astype(np.float32)
    torch.manual_seed(0)
    rotated = PointsCodec(train=True, augment={"rotate": "up"})._augmented(xyz.copy())
    # rotation about z keeps z and the xy radius
    np.testing.assert_allclose(rotated[:, 2], xyz[:, 2], atol=1e-6)
    np.testing.assert_allclose(np.hypot(*rotated[:, :2].T), np.hypot(*xyz[:, :2].T), atol=1e-5)
    torch.manual_seed(0)
    so3 = PointsCodec(train=True, augment={"rotate": "so3"})._augmented(xyz.copy())
    np.testing.assert_allclose(np.linalg.norm(so3, axis=1), np.linalg.norm(xyz, axis=1), atol=1e-5)
    with pytest.raises(ValueError, match="presets: none, scale_translate, rotate"):
        PointsCodec(train=True, augment="spin")
    with pytest.raises(ValueError, match="keys are"):
        PointsCodec(train=True, augment={"spin": 1})
    with pytest.raises(ValueError, match=r"float point cloud \[P, 3 \+ C\]"):
        buf = io.BytesIO()
        np.save(buf, np.zeros((4, 2), np.float32))
        PointsCodec(train=False).decode(buf.getvalue(), "npy", "k")


# -------------------------------------------------------------------------------------------------------- audio


@pytest.fixture(scope="module")
def audio_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio")
    rng = np.random.default_rng(0)
    waves = {
        "a16k": (rng.normal(size=8000).astype(np.float32) * 0.1, 16000),
        "b22k": (rng.normal(size=11025).astype(np.float32) * 0.1, 22050),  # resampled to 16 kHz
        "c_short": (rng.normal(size=100).astype(np.float32) * 0.1, 16000),  # padded to one 25 ms window
        "d_silent": (np.zeros(4000, np.float32), 16000),
        "e_stereo": (rng.normal(size=(3000, 2)).astype(np.float32) * 0.1, 16000),
    }
    samples = [{"__key__": k, "flac": _flac(w, r), "cls": i % 2} for i, (k, (w, r)) in enumerate(waves.items())]
    samples.append({"__key__": "f_corrupt", "flac": b"fLaC" + bytes(200), "cls": 0})
    write_shards(samples, root, "test", modality="audio", class_names=["x", "y"], progress=False)
    return root, waves


def _stored(wave: np.ndarray) -> np.ndarray:
    """What a 16-bit FLAC gives back."""
    return soundfile.read(io.BytesIO(_flac(wave, 16000)), dtype="float32", always_2d=True)[0]


def test_audio_batches_resample_pad_and_mask(audio_shards):
    root, waves = audio_shards
    loader = build_loader(root, "test", batch_size=8, num_workers=0, shuffle=False)
    (batch,) = _read(loader)
    assert loader.modality == "audio" and batch.key == ["a16k", "b22k", "c_short", "d_silent", "e_stereo"]
    lengths = batch.mask.sum(1).tolist()
    assert lengths == [8000, 8000, 400, 4000, 3000] and batch.inputs.shape == (5, 8000)
    torch.testing.assert_close(batch.inputs[0], torch.from_numpy(_stored(waves["a16k"][0])[:, 0]))
    stored22 = soundfile.read(io.BytesIO(_flac(*waves["b22k"])), dtype="float32")[0]
    torch.testing.assert_close(batch.inputs[1], AF.resample(torch.from_numpy(stored22), 22050, 16000))
    assert (batch.inputs[2, 100:] == 0).all() and (batch.inputs[2, :100] != 0).any()
    stereo = soundfile.read(io.BytesIO(_flac(*waves["e_stereo"])), dtype="float32")[0]
    torch.testing.assert_close(batch.inputs[4, :3000], torch.from_numpy(stereo.mean(1)))
    assert loader.stats["corrupt"] == 1 and "f_corrupt" in loader.stats["reasons"][0]
    # silent and short clips tokenize to finite tokens; the loader's mask reaches the tokenizer
    tokens = create_tokenizer("audio_frames", stack=2)(batch.inputs, mask=batch.mask)
    assert torch.isfinite(tokens.x).all()
    assert tokens.mask.sum(1).tolist() == [24, 24, 1, 12, 9]  # 1 + (n - 400) // 160 frames, 2 per token


def test_audio_crop_is_random_in_training_and_from_the_start_in_eval(audio_shards):
    root, waves = audio_shards
    (evalb,) = _read(build_loader(root, "test", batch_size=8, num_workers=0, shuffle=False, max_seconds=0.1))
    assert evalb.inputs.shape == (5, 1600)
    torch.testing.assert_close(evalb.inputs[0], torch.from_numpy(_stored(waves["a16k"][0])[:1600, 0]))
    codec = AudioCodec(train=True, max_seconds=0.1)
    data = _flac(waves["a16k"][0], 16000)
    torch.manual_seed(0)
    crops = {codec.decode(data, "flac", "k")[:4].tobytes() for _ in range(5)}
    assert len(crops) > 1


# -------------------------------------------------------------------------------------------------------- video


def _moving_square(t: int, size: int, step: int) -> np.ndarray:
    frames = np.full((t, size, size, 3), 40, np.uint8)
    for i in range(t):
        frames[i, 16:32, 8 + step * i : 24 + step * i] = 220
    return frames


@pytest.fixture(scope="module")
def video_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("video")
    samples = [
        {"__key__": "v8", "mp4": encode_video(_moving_square(8, 48, 2)), "cls": 0},
        {"__key__": "v5", "mp4": encode_video(_moving_square(5, 48, 3)), "cls": 1},
        {"__key__": "bad", "mp4": b"\x00\x00\x00\x18ftypmp42" + bytes(64), "cls": 0},
    ]
    write_shards(samples, root, "test", modality="video", class_names=["r", "l"], progress=False)
    return root


def test_video_batches_normalise_frames_pad_with_a_frame_mask_and_carry_codec_motion(video_shards):
    loader = build_loader(
        video_shards, "test", batch_size=4, num_workers=0, shuffle=False, num_frames=8, frame_sampling="stride",
        motion_vectors=True,
    )  # fmt: skip
    (batch,) = _read(loader)
    assert batch.inputs.shape == (2, 8, 3, 48, 48) and batch.inputs.dtype == torch.float32
    assert batch.mask.tolist() == [[True] * 8, [True] * 5 + [False] * 3]
    assert batch.extra["motion"].shape == (2, 7, 2, 3, 3)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    pixels = batch.inputs[0, 0] * std + mean
    assert abs(float(pixels[:, 2, 2].mean()) - 40 / 255) < 0.03  # background survives the codec
    assert loader.stats["corrupt"] == 1 and "bad" in loader.stats["reasons"][0]
    tok = create_tokenizer("video_tubelets", img_size=48, num_frames=8, patch_size=16, embed_dim=32)
    tokens = tok(batch.inputs, mask=batch.mask)
    assert tokens.grid == (4, 3, 3) and tokens.mask.sum(1).tolist() == [36, 27]
    with pytest.raises(ValueError, match="augment"):
        build_loader(video_shards, "test", batch_size=2, augment=True)


# ---------------------------------------------------------------------------------- padding-invariant encoders


def test_backbone_blocks_ignore_padded_tokens():
    """An AST-style encoder (audio patches + timm blocks): a clip's tokens are the same alone and padded in a batch
    with a longer clip, because the loader's mask reaches the tokenizer and the blocks' attention."""
    torch.manual_seed(0)
    backbone = TimmViT("vit_tiny_patch16_224", image_tokenizer=False, embed_dim=32, depth=2, num_heads=2)
    tokenizer = create_tokenizer("audio_patches", embed_dim=32, target_frames=64, fstride=16, tstride=16)
    encoder = MMEncoder(tokenizer, backbone).eval()
    short, long = torch.randn(1, 4000), torch.randn(1, 8000)
    batch = torch.cat([torch.nn.functional.pad(short, (0, 4000)), long])
    mask = torch.arange(8000) < torch.tensor([[4000], [8000]])
    with torch.no_grad():
        alone = encoder.forward_features(short, mask=torch.ones(1, 4000, dtype=torch.bool))
        both = encoder.forward_features(batch, mask=mask)
    real = both.mask[0]
    assert 0 < int(real.sum()) < real.numel()
    torch.testing.assert_close(both.x[0, real], alone.x[0, alone.mask[0]][: int(real.sum())], atol=1e-5, rtol=1e-5)
