"""Video I/O (PyAV encode/decode, sampling, errors) and `video_tubelets` (oracle: transformers VideoMAE)."""

from __future__ import annotations

import io
import itertools

import av
import numpy as np
import pytest
import torch
from oracles import randomize, resize_matrix

from mmblocks.data.video_io import (
    VideoClip,
    VideoDecodeError,
    collate_clips,
    decode_video,
    encode_video,
    sample_indices,
)
from tokenizers_mm import Tokens, create_tokenizer, list_tokenizers
from tokenizers_mm.video import VideoTubelets, normalize_frames, sinusoid_table


def textured_clip(t: int = 8, h: int = 64, w: int = 64, seed: int = 0) -> np.ndarray:
    """uint8 [T, H, W, 3] grey clip: a static 4x4-cell random background with a textured square moving (+2, +1)."""
    rng = np.random.default_rng(seed)
    bg = np.kron(rng.integers(0, 256, (h // 4, w // 4)), np.ones((4, 4))).astype(np.uint8)
    tex = np.kron(rng.integers(0, 256, (6, 6)), np.ones((4, 4))).astype(np.uint8)
    frames = []
    for i in range(t):
        f = bg.copy()
        y, x = 8 + i, 8 + 2 * i
        f[y : y + 24, x : x + 24] = tex
        frames.append(np.repeat(f[..., None], 3, axis=-1))
    return np.stack(frames)


@pytest.fixture(scope="module")
def clip8() -> np.ndarray:
    return textured_clip(8)


@pytest.fixture(scope="module")
def mp4_8(clip8) -> bytes:
    return encode_video(clip8, fps=8)


# ---------------------------------------------------------------------------------------------------- encode/decode
def test_round_trip_shape_fps_and_quality(clip8, mp4_8):
    clip = decode_video(mp4_8)
    assert isinstance(clip, VideoClip)
    assert clip.frames.dtype == torch.uint8 and tuple(clip.frames.shape) == (8, 64, 64, 3)
    assert clip.num_source_frames == 8 and clip.num_frames == 8
    assert clip.fps == pytest.approx(8.0)
    assert clip.indices.tolist() == list(range(8))
    assert clip.motion is None
    err = (clip.frames.float() - torch.from_numpy(clip8).float()).abs().mean().item()
    assert err < 3.0, f"mean abs error {err:.2f} of the default mpeg4 quality is too high"


def test_encode_is_deterministic_and_accepts_torch(clip8, mp4_8):
    assert encode_video(clip8, fps=8) == mp4_8
    assert encode_video(torch.from_numpy(clip8), fps=8) == mp4_8
    assert mp4_8[4:8] == b"ftyp"


@pytest.mark.skipif("libx264" not in av.codecs_available, reason="no libx264 in this FFmpeg build")
def test_libx264_round_trip(clip8):
    data = encode_video(clip8, fps=12.5, codec="libx264")
    assert data == encode_video(clip8, fps=12.5, codec="libx264")
    clip = decode_video(data)
    assert tuple(clip.frames.shape) == (8, 64, 64, 3) and clip.fps == pytest.approx(12.5)
    assert (clip.frames.float() - torch.from_numpy(clip8).float()).abs().mean() < 3.0


def test_decode_from_path_and_file_object(tmp_path, mp4_8):
    path = tmp_path / "clip.mp4"
    path.write_bytes(mp4_8)
    ref = decode_video(mp4_8, num_frames=4)
    for src in (path, str(path), io.BytesIO(mp4_8), bytearray(mp4_8), memoryview(mp4_8)):
        got = decode_video(src, num_frames=4)
        assert torch.equal(got.frames, ref.frames) and torch.equal(got.indices, ref.indices)


def test_sampled_frames_equal_the_full_decode_at_their_indices(mp4_8):
    full = decode_video(mp4_8).frames
    uni = decode_video(mp4_8, num_frames=3)
    assert uni.indices.tolist() == [0, 4, 7]
    assert torch.equal(uni.frames, full[uni.indices])
    st = decode_video(mp4_8, num_frames=3, sampling="stride", stride=2, start=1)
    assert st.indices.tolist() == [1, 3, 5]
    assert torch.equal(st.frames, full[st.indices])


def _remux(data: bytes, fmt: str) -> bytes:
    out = io.BytesIO()
    with av.open(io.BytesIO(data)) as src, av.open(out, "w", format=fmt) as dst:
        stream = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                dst.mux(packet)
    return out.getvalue()


def test_container_without_frame_count_is_counted(mp4_8, monkeypatch):
    import mmblocks.data.video_io as vio

    mkv = _remux(mp4_8, "matroska")
    with av.open(io.BytesIO(mkv)) as c:
        assert c.streams.video[0].frames == 0  # matroska stores no frame count: decode_video counts packets
    ref = decode_video(mp4_8, num_frames=3, export_mvs=True)
    got = decode_video(mkv, num_frames=3, export_mvs=True)
    assert got.num_source_frames == 8 and got.indices.tolist() == [0, 4, 7]
    assert torch.equal(got.frames, ref.frames) and torch.equal(got.motion, ref.motion)
    # a frame count that overstates the stream: decoding hits the end early and resamples on what decoded
    monkeypatch.setattr(vio, "_count_frames", lambda target, data: 20)
    again = decode_video(mkv, num_frames=3)
    assert again.num_source_frames == 8 and again.indices.tolist() == [0, 4, 7]


@pytest.mark.parametrize("bad", [(6, 64, 63, 3), (6, 64, 64), (6, 64, 64, 4)])
def test_encode_rejects_bad_shapes(bad):
    with pytest.raises(ValueError):
        encode_video(np.zeros(bad, np.uint8))


def test_encode_rejects_bad_dtype_and_codec():
    with pytest.raises(TypeError, match="uint8"):
        encode_video(np.zeros((2, 16, 16, 3), np.float32))
    with pytest.raises(ValueError, match="codec"):
        encode_video(np.zeros((2, 16, 16, 3), np.uint8), codec="vp9")
    with pytest.raises(ValueError, match="T=0"):
        encode_video(np.zeros((0, 16, 16, 3), np.uint8))


# ---------------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("n,k", [(10, 4), (8, 3), (16, 16), (300, 16), (3, 6), (1, 4), (7, 1)])
def test_uniform_indices_are_rounded_linspace(n, k):
    got = sample_indices(n, k, "uniform")
    ref = np.floor(np.linspace(0, n - 1, k) + 0.5).astype(int).tolist()
    assert got == ref and len(got) == k
    assert got[0] == 0 and (k == 1 or got[-1] == n - 1)
    assert all(a <= b for a, b in itertools.pairwise(got))


def test_uniform_known_values_and_short_clip_repeats():
    assert sample_indices(10, 4) == [0, 3, 6, 9]
    assert sample_indices(8, 3) == [0, 4, 7]  # 3.5 rounds half up
    assert sample_indices(3, 6) == [0, 0, 1, 1, 2, 2]  # shorter than asked: frames repeat evenly
    assert sample_indices(5) == [0, 1, 2, 3, 4]


def test_stride_indices_and_short_clip_returns_fewer():
    assert sample_indices(10, 3, "stride", stride=3, start=1) == [1, 4, 7]
    assert sample_indices(10, 4, "stride", stride=4) == [0, 4, 8]  # fewer than asked, no repeats
    assert sample_indices(10, None, "stride", stride=4, start=2) == [2, 6]


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(num_frames=0), "num_frames"),
        (dict(sampling="random"), "sampling"),
        (dict(sampling="stride", stride=0), "stride"),
        (dict(sampling="stride", start=10), "start"),
        (dict(sampling="uniform", start=2), "uniform"),
    ],
)
def test_sampling_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        sample_indices(10, **kw)


def test_short_clip_with_stride_collates_with_a_frame_mask(mp4_8):
    short = decode_video(mp4_8, num_frames=4, sampling="stride", stride=3)  # 0, 3, 6 only
    full = decode_video(mp4_8, num_frames=4, sampling="stride", stride=2)
    assert short.indices.tolist() == [0, 3, 6] and full.indices.tolist() == [0, 2, 4, 6]
    frames, mask, motion = collate_clips([short, full], num_frames=4)
    assert tuple(frames.shape) == (2, 4, 64, 64, 3) and motion is None
    assert mask.tolist() == [[True, True, True, False], [True, True, True, True]]
    assert frames[0, 3].sum() == 0 and torch.equal(frames[0, :3], short.frames)
    tok = VideoTubelets(img_size=64, num_frames=4, embed_dim=8, tubelet_size=2)
    out = tok(normalize_frames(frames), mask=mask)
    per_t = out.mask.reshape(2, 2, 16)
    # a tubelet is real if its first frame is: tubelet 1 of clip 0 starts on real frame 2 (frame 3 is padding).
    assert per_t.all()
    with pytest.raises(ValueError, match="more than num_frames"):
        collate_clips([full], num_frames=3)


# ---------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "data",
    [b"not a video at all" * 8, b"\x00" * 1000, bytes(range(256)) * 4],
    ids=["text", "zeros", "bytes"],
)
def test_garbage_bytes_raise_video_decode_error(data):
    with pytest.raises(VideoDecodeError) as info:
        decode_video(data)
    msg = str(info.value)
    assert f"{len(data)} bytes" in msg and repr(data[:16]) in msg
    assert "Error" in msg  # the underlying FFmpeg error is named
    assert isinstance(info.value, ValueError)


def test_empty_truncated_and_missing_inputs(tmp_path, mp4_8):
    with pytest.raises(VideoDecodeError, match="0 bytes"):
        decode_video(b"")
    with pytest.raises(VideoDecodeError, match=f"{len(mp4_8) // 2} bytes"):
        decode_video(mp4_8[: len(mp4_8) // 2])
    with pytest.raises(VideoDecodeError, match="missing"):
        decode_video(tmp_path / "nope.mp4")
    with pytest.raises(TypeError, match="bytes, a path or a binary file"):
        decode_video(12345)
    with pytest.raises(ValueError, match="thread_type"):
        decode_video(mp4_8, thread_type="MANY")


def test_audio_only_container_has_no_video_stream():
    buf = io.BytesIO()
    with av.open(buf, "w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    with pytest.raises(VideoDecodeError, match="no video stream"):
        decode_video(buf.getvalue())


def test_one_frame_video(clip8):
    data = encode_video(clip8[:1])
    clip = decode_video(data, export_mvs=True)
    assert tuple(clip.frames.shape) == (1, 64, 64, 3) and clip.num_source_frames == 1
    assert tuple(clip.motion.shape) == (0, 2, 4, 4)  # documented: an empty motion field
    assert decode_video(data, num_frames=4).indices.tolist() == [0, 0, 0, 0]
    tok = VideoTubelets(img_size=64, num_frames=2, embed_dim=8)
    with pytest.raises(ValueError, match="repeat the frame 2 times"):
        tok(normalize_frames(clip.frames[None]))
    assert tok(normalize_frames(clip.frames[None].repeat(1, 2, 1, 1, 1))).grid == (1, 4, 4)


# ---------------------------------------------------------------------------------------------------- tubelets
def _videomae(t, size, patch, tubelet, dim=24, channels=3):
    from transformers import VideoMAEConfig, VideoMAEModel

    torch.manual_seed(0)
    cfg = VideoMAEConfig(
        image_size=size,
        patch_size=patch,
        num_channels=channels,
        num_frames=t,
        tubelet_size=tubelet,
        hidden_size=dim,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    return randomize(VideoMAEModel(cfg), vector_scale=0.5).eval()


@pytest.mark.parametrize(
    "t,size,patch,tubelet,channels", [(4, 32, 16, 2, 3), (6, 48, 8, 3, 3), (8, 32, 16, 2, 1), (2, 16, 4, 1, 3)]
)
def test_tubelets_equal_videomae_embeddings(t, size, patch, tubelet, channels):
    hf = _videomae(t, size, patch, tubelet, channels=channels)
    conv = hf.embeddings.patch_embeddings.projection
    assert conv.bias.abs().min() > 1e-3  # randomised: a lost or zeroed bias changes every token
    tok = VideoTubelets.from_videomae(hf)
    x = torch.randn(2, t, channels, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf.embeddings(x, None)
        out = tok(x)
    assert out.x.shape == ref.shape
    assert (out.x - ref).abs().max().item() <= 1e-5
    grid = (t // tubelet, size // patch, size // patch)
    assert out.grid == grid and out.num_tokens == tok.num_tokens(t, size, size) == hf.embeddings.num_patches
    assert out.modality == "video" and out.num_prefix == 0 and out.mask is None
    # pos: (t, row, col) of each tubelet, t-major as VideoMAE's flatten
    assert out.pos[0, 0].tolist() == [0.0, 0.0, 0.0]
    assert out.pos[0, 1].tolist() == [0.0, 0.0, 1.0]
    if grid[0] > 1:
        assert out.pos[0, grid[1] * grid[2]].tolist() == [1.0, 0.0, 0.0]
    assert out.pos[0, -1].tolist() == [float(g - 1) for g in grid]


def test_sincos_table_is_byte_identical_to_videomae():
    from transformers.models.videomae.modeling_videomae import get_sinusoid_encoding_table

    for n, d in [(8, 24), (1568, 768), (37, 33)]:
        assert torch.equal(sinusoid_table(n, d), get_sinusoid_encoding_table(n, d))


def test_from_videomae_accepts_embeddings_and_classifier():
    from transformers import VideoMAEForVideoClassification

    hf = _videomae(4, 32, 16, 2)
    tok = VideoTubelets.from_videomae(hf.embeddings)
    assert torch.equal(tok.proj.weight, hf.embeddings.patch_embeddings.projection.weight)
    clf = VideoMAEForVideoClassification(hf.config)
    assert torch.equal(
        VideoTubelets.from_videomae(clf).proj.weight, clf.videomae.embeddings.patch_embeddings.projection.weight
    )
    with pytest.raises(TypeError, match="VideoMAE"):
        VideoTubelets.from_videomae(torch.nn.Linear(2, 2))


def _tubelet_reference(tok: VideoTubelets, x: torch.Tensor, grid: tuple[int, int, int]) -> np.ndarray:
    """float64 ``[B, 1 + prod(grid), D]``: cls token, then each tubelet's pixels dotted with the conv kernel + bias
    + the learned table trilinearly resampled from the training grid to ``grid`` (t-major, then row, col)."""
    xs = x.double().numpy()
    b, t, c, h, w = xs.shape
    kt, p = tok.tubelet_size, tok.patch_size
    d = tok.embed_dim
    weight = tok.proj.weight.detach().double().numpy()  # [D, C, kt, p, p]
    bias = tok.proj.bias.detach().double().numpy()
    tub = xs.reshape(b, t // kt, kt, c, h // p, p, w // p, p).transpose(0, 1, 4, 6, 3, 2, 5, 7)  # [B,T',H',W',C,kt,p,p]
    tokens = tub.reshape(b, -1, c * kt * p * p) @ weight.reshape(d, -1).T + bias
    if tok.pos_embed is not None:
        table = tok.pos_embed.detach().double().numpy().reshape(*tok.train_grid, d)
        mt, mh, mw = (resize_matrix(a, g) for a, g in zip(tok.train_grid, grid))
        tokens = tokens + np.einsum("at,bh,cw,thwd->abcd", mt, mh, mw, table).reshape(1, -1, d)
    if tok.cls_token is None:
        return tokens
    cls = np.broadcast_to(tok.cls_token.detach().double().numpy(), (b, 1, d))
    return np.concatenate([cls, tokens], axis=1)


def test_class_token_and_learned_positions():
    tok = VideoTubelets(img_size=32, num_frames=4, patch_size=16, embed_dim=8, pos_embed="learned", class_token=True)
    randomize(tok, seed=2, vector_scale=0.5)  # cls, bias and table well away from their near-zero init
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 3, 32, 32, generator=g)
    with torch.no_grad():
        out = tok(x)
    assert out.num_prefix == 1 and out.grid == (2, 2, 2) and out.num_tokens == 9 == tok.num_tokens(4, 32, 32)
    assert out.pos[0, 0].tolist() == [-1.0, -1.0, -1.0]
    np.testing.assert_allclose(out.x.numpy(), _tubelet_reference(tok, x, (2, 2, 2)), atol=1e-4, rtol=0)
    big = torch.randn(1, 8, 3, 48, 64, generator=g)
    with torch.no_grad():
        bigger = tok(big)  # resampled table: (2, 2, 2) -> (4, 3, 4)
    assert bigger.grid == (4, 3, 4) and bigger.num_tokens == 1 + 48
    np.testing.assert_allclose(bigger.x.numpy(), _tubelet_reference(tok, big, (4, 3, 4)), atol=1e-4, rtol=0)
    none = randomize(VideoTubelets(img_size=32, num_frames=4, embed_dim=8, pos_embed="none"), seed=4, vector_scale=0.5)
    with torch.no_grad():
        np.testing.assert_allclose(none(x).x.numpy(), _tubelet_reference(none, x, (2, 2, 2)), atol=1e-4, rtol=0)


def test_frame_mask_marks_tubelets_by_their_first_frame():
    tok = VideoTubelets(img_size=16, num_frames=8, patch_size=16, embed_dim=4, class_token=True)
    mask = torch.tensor(
        [[1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool
    )
    out = tok(torch.randn(3, 8, 3, 16, 16), mask=mask)
    assert out.mask.tolist() == [
        [True, True, True, True, True],
        [True, True, True, False, False],
        [True, True, True, True, False],
    ]
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        tok(torch.randn(3, 8, 3, 16, 16), mask=mask[:, :4])


@pytest.mark.parametrize(
    "shape,match",
    [
        ((1, 7, 3, 32, 32), "T=7 frames does not split into tubelets of 2.*e.g. 8"),
        ((1, 8, 3, 40, 32), "not a multiple of the patch size 16"),
        ((1, 8, 1, 32, 32), "expects 3 channels"),
        ((1, 8, 32, 32, 3), "expects 3 channels.*normalize_frames"),
        ((8, 3, 32, 32), r"\[B, T, C, H, W\]"),
    ],
)
def test_tubelet_errors(shape, match):
    tok = VideoTubelets(img_size=32, num_frames=8, embed_dim=8)
    with pytest.raises(ValueError, match=match):
        tok(torch.randn(shape))


def test_tubelets_reject_uint8_and_bad_pos_kind():
    tok = VideoTubelets(img_size=32, num_frames=2, embed_dim=8)
    with pytest.raises(TypeError, match="normalize_frames"):
        tok(torch.zeros(1, 2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="pos_embed"):
        VideoTubelets(pos_embed="rope")


def test_normalize_frames_matches_manual_formula(clip8):
    frames = torch.from_numpy(clip8)
    x = normalize_frames(frames)
    assert tuple(x.shape) == (1, 8, 3, 64, 64)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    ref = (frames.float() / 255 - mean) / std
    assert torch.allclose(x[0], ref.permute(0, 3, 1, 2), atol=1e-6)


def test_registry_and_decode_to_tokens_pipeline(mp4_8):
    assert {"video_tubelets", "motion", "keyframe_motion"} <= set(list_tokenizers())
    tok = create_tokenizer("video_tubelets", img_size=64, num_frames=8, embed_dim=16)
    assert isinstance(tok, VideoTubelets)
    clip = decode_video(mp4_8, num_frames=8)
    out = tok(normalize_frames(clip.frames))
    assert isinstance(out, Tokens) and out.grid == (4, 4, 4) and tuple(out.x.shape) == (1, 64, 16)
