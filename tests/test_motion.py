"""Block matching (oracle: known synthetic motion + a per-block NumPy loop), codec motion vectors (PyAV) and the
`motion` / `keyframe_motion` tokenizers."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch

from mmblocks.data.video_io import collate_clips, decode_video, encode_video
from tokenizers_mm import Tokens, create_tokenizer
from tokenizers_mm.image import ImagePatches
from tokenizers_mm.motion import (
    KeyframeMotion,
    MotionTokens,
    block_matching,
    candidate_displacements,
    luminance,
)
from tokenizers_mm.video import VideoTubelets, normalize_frames

SIZE, SQUARE, BLOCK = 96, 48, 16


def texture(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    """uint8 ``[n, n]`` random texture: ``cells`` = 4x4-pixel random cells (hard: no gradient for a codec's search),
    ``smooth`` = bicubic upsampling of 8-pixel random cells (natural-image-like: smooth but no flat areas)."""
    if kind == "cells":
        return np.kron(rng.integers(0, 256, (n // 4, n // 4)), np.ones((4, 4))).astype(np.uint8)
    cells = torch.from_numpy(rng.integers(0, 256, (n // 8 + 2, n // 8 + 2)).astype(np.float32))[None, None]
    up = torch.nn.functional.interpolate(cells, scale_factor=8, mode="bicubic", align_corners=False)[
        0, 0, 8 : 8 + n, 8 : 8 + n
    ]
    return ((up - up.min()) / (up.max() - up.min()) * 255).round().numpy().astype(np.uint8)


def moving_square(
    dx: int, dy: int, t: int = 4, seed: int = 0, kind: str = "cells"
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """uint8 grey ``[T, 96, 96, 3]``: a static random background and a 48 px textured square moving (dx, dy) per
    frame (`texture` kind). Also returns the square's top-left (x, y) per frame."""
    rng = np.random.default_rng(seed)
    bg, tex = texture(rng, SIZE, kind), texture(rng, SQUARE, kind)
    x0 = (SIZE - SQUARE) // 2 - dx * (t - 1) // 2
    y0 = (SIZE - SQUARE) // 2 - dy * (t - 1) // 2
    frames, corners = [], []
    for i in range(t):
        x, y = x0 + dx * i, y0 + dy * i
        assert 0 <= x <= SIZE - SQUARE and 0 <= y <= SIZE - SQUARE
        f = bg.copy()
        f[y : y + SQUARE, x : x + SQUARE] = tex
        frames.append(np.repeat(f[..., None], 3, axis=-1))
        corners.append((x, y))
    return np.stack(frames), corners


def block_masks(corners, t: int) -> tuple[np.ndarray, np.ndarray]:
    """Blocks of frame t+1 fully inside the square, and blocks touching the square in neither frame t nor t+1."""
    n = SIZE // BLOCK
    r0 = np.arange(n)[:, None] * BLOCK
    c0 = np.arange(n)[None, :] * BLOCK

    def inside(x, y):
        return (c0 >= x) & (c0 + BLOCK <= x + SQUARE) & (r0 >= y) & (r0 + BLOCK <= y + SQUARE)

    def touches(x, y):
        return (c0 < x + SQUARE) & (c0 + BLOCK > x) & (r0 < y + SQUARE) & (r0 + BLOCK > y)

    (xa, ya), (xb, yb) = corners[t], corners[t + 1]
    return inside(xb, yb), ~(touches(xa, ya) | touches(xb, yb))


def as_input(frames: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> uint8 [1, T, 3, H, W]."""
    return torch.from_numpy(frames).permute(0, 3, 1, 2)[None]


MOTIONS = [(3, 2), (-2, 5), (-4, -3), (6, 0), (0, -7), (1, -1)]


# ---------------------------------------------------------------------------------------------------- block matching
@pytest.mark.parametrize("kind", ["cells", "smooth"])
@pytest.mark.parametrize("dx,dy", MOTIONS)
def test_block_matching_recovers_known_motion(dx, dy, kind):
    frames, corners = moving_square(dx, dy, kind=kind)
    mv = block_matching(as_input(frames), block=BLOCK, search=7)
    assert tuple(mv.shape) == (1, 3, 2, 6, 6) and mv.dtype == torch.float32
    for t in range(3):
        inner, background = block_masks(corners, t)
        assert inner.sum() >= 2
        assert (mv[0, t, 0][inner] == dx).all() and (mv[0, t, 1][inner] == dy).all()
        assert (mv[0, t][:, background] == 0).all()


def test_static_clip_gives_zero_motion():
    frames, _ = moving_square(0, 0)
    assert (block_matching(as_input(frames)) == 0).all()
    flat = torch.full((2, 3, 3, 32, 32), 7.0)  # every candidate ties: the smallest displacement wins
    assert (block_matching(flat, search=3) == 0).all()


def reference_block_matching(frames, block: int, search: int) -> np.ndarray:
    """Exhaustive block search written from `block_matching`'s documented definition (independent of its code).

    ``frames [B, T, C, H, W]`` (C = 3 RGB or 1 luma). Luma ``Y = 0.299 R + 0.587 G + 0.114 B`` in float32 (the
    documented float32 luminance), C = 1 taken as is. For block ``(r, c)`` of frame ``t+1`` and every ``(dx, dy)``
    with ``|dx|, |dy| <= search``: ``SAD = sum_p |Y[t+1](p) - Y[t](p - (dx, dy))|`` with frame ``t`` edge-extended
    (coordinates clamped into the frame), summed exactly in float64. The smallest SAD wins; a tie goes to the
    smallest ``dx^2 + dy^2``, then the smallest ``dy``, then the smallest ``dx``. Returns ``[B, T-1, 2, H/b, W/b]``
    float32 (dx, dy).
    """
    x = np.asarray(frames)
    n, t, c, h, w = x.shape
    if c == 3:
        r, g, b = (x[:, :, i].astype(np.float32) for i in range(3))
        y = r * np.float32(0.299) + g * np.float32(0.587) + b * np.float32(0.114)
    else:
        assert c == 1
        y = x[:, :, 0].astype(np.float32)
    y = y.astype(np.float64)
    out = np.zeros((n, t - 1, 2, h // block, w // block), np.float32)
    for i in range(n):
        for j in range(t - 1):
            prev, cur = y[i, j], y[i, j + 1]
            for br in range(h // block):
                for bc in range(w // block):
                    rows = np.arange(br * block, (br + 1) * block)
                    cols = np.arange(bc * block, (bc + 1) * block)
                    blk = cur[np.ix_(rows, cols)]
                    best_key, best = None, None
                    for dy in range(-search, search + 1):
                        for dx in range(-search, search + 1):
                            src = prev[np.ix_(np.clip(rows - dy, 0, h - 1), np.clip(cols - dx, 0, w - 1))]
                            key = (np.abs(blk - src).sum(), dx * dx + dy * dy, dy, dx)
                            if best_key is None or key < best_key:
                                best_key, best = key, (dx, dy)
                    out[i, j, :, br, bc] = best
    return out


def test_reference_block_matching_on_hand_made_cases():
    # a 4x4 block of frame 1 equals frame 0 shifted by (+1, +2): content moved right 1, down 2
    f0 = np.arange(64, dtype=np.float32).reshape(8, 8) * 7 % 61
    f1 = np.empty_like(f0)
    for yy in range(8):
        for xx in range(8):
            f1[yy, xx] = f0[min(max(yy - 2, 0), 7), min(max(xx - 1, 0), 7)]
    mv = reference_block_matching(np.stack([f0, f1])[None, :, None], 4, 2)
    assert mv[0, 0, :, 1, 1].tolist() == [1.0, 2.0]
    # all-tied (flat) frames -> (0, 0); alternating columns: every (+-1, dy) costs the same, (-1, 0) wins the tie
    assert (reference_block_matching(np.full((1, 2, 1, 4, 4), 3.0), 4, 2) == 0).all()
    stripes = np.tile(np.array([0.0, 9.0]), (4, 2))  # columns alternate: shifting by +-1 costs the same
    tie = reference_block_matching(np.stack([stripes, 9.0 - stripes])[None, :, None], 4, 1)
    assert tie[0, 0, :, 0, 0].tolist() == [-1.0, 0.0]


@pytest.mark.parametrize(
    "shape,dtype,block,search",
    [
        ((2, 3, 1, 32, 48), "float32", 16, 4),  # integer luma: exact SADs, ties included
        ((1, 2, 3, 16, 24), "uint8", 8, 2),  # RGB
        ((1, 2, 1, 16, 24), "float32", 8, 9),  # search window larger than the block (deep edge extension)
    ],
)
def test_block_matching_equals_the_exhaustive_reference(shape, dtype, block, search):
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, shape, generator=g).to(getattr(torch, dtype))
    if shape[2] == 1:
        frames[:, :, :, :8] = 5  # flat rows -> many tied candidates
        frames[:, :, :, :, : shape[-1] // 3] = (frames[:, :, :, :, : shape[-1] // 3] // 64) * 64  # coarse: more ties
    ref = reference_block_matching(frames.numpy(), block, search)
    assert torch.equal(block_matching(frames, block, search), torch.from_numpy(ref))


def test_block_matching_ties_follow_the_documented_order():
    # frame 1 = frame 0's checkerboard inverted: the four unit shifts all match exactly (interior blocks), so the
    # documented order decides: smallest dx^2 + dy^2, then smallest dy -> (0, -1); period-4 columns add (+-2, 0) ties
    checker = (np.indices((24, 24)).sum(0) % 2) * 200.0
    cols = np.tile(np.array([0.0, 0.0, 50.0, 50.0]), (24, 6))
    frames = torch.tensor(np.stack([np.stack([checker, 200.0 - checker]), np.stack([cols, 50.0 - cols])]))[:, :, None]
    ref = reference_block_matching(frames.numpy(), 8, 2)
    assert ref[0, 0, :, 1, 1].tolist() == [0.0, -1.0] and ref[1, 0, :, 1, 1].tolist() == [-2.0, 0.0]
    assert torch.equal(block_matching(frames.float(), 8, 2), torch.from_numpy(ref))


def test_block_matching_equals_the_exhaustive_reference_on_motion():
    frames, _ = moving_square(2, -3, t=3)
    x = as_input(frames)
    assert torch.equal(block_matching(x, 16, 5), torch.from_numpy(reference_block_matching(x.numpy(), 16, 5)))


def test_candidates_and_luminance():
    cands = candidate_displacements(2)
    assert len(cands) == 25 and cands[0] == (0, 0) and set(cands[1:5]) == {(1, 0), (-1, 0), (0, 1), (0, -1)}
    rgb = torch.tensor([255.0, 0.0, 0.0]).view(1, 1, 3, 1, 1)
    assert luminance(rgb).item() == pytest.approx(0.299 * 255)
    assert luminance(torch.ones(1, 1, 1, 2, 2)).shape == (1, 1, 2, 2)


@pytest.mark.parametrize(
    "shape,kw,match",
    [
        ((1, 1, 3, 32, 32), {}, "at least 2 frames"),
        ((1, 3, 3, 40, 32), {}, "not a multiple of the block size 16"),
        ((1, 3, 2, 32, 32), {}, "C=2"),
        ((3, 3, 32, 32), {}, r"\[B, T, C, H, W\]"),
        ((1, 3, 3, 32, 32), {"search": -1}, "search"),
    ],
)
def test_block_matching_errors(shape, kw, match):
    with pytest.raises(ValueError, match=match):
        block_matching(torch.zeros(shape), **kw)


# ---------------------------------------------------------------------------------------------------- codec vectors
@pytest.mark.parametrize("codec", ["mpeg4", "libx264"])
@pytest.mark.parametrize("dx,dy", [(3, 2), (-2, 5), (-4, -3)])
def test_codec_motion_vectors_agree_with_the_true_motion(codec, dx, dy):
    if codec not in av.codecs_available:
        pytest.skip(f"no {codec} in this FFmpeg build")
    # Codec vectors are rate-distortion choices of a predictive search (EPZS / hex), not exhaustive: they follow
    # the true motion on natural, smooth content; on 4x4 random cells the first P frame often gets no true vector.
    frames, corners = moving_square(dx, dy, t=5, kind="smooth")
    clip = decode_video(encode_video(frames, codec=codec), export_mvs=True)
    mv = clip.motion
    assert tuple(mv.shape) == (4, 2, 6, 6) and mv.dtype == torch.float32
    bm = block_matching(normalize_frames(clip.frames))[0]
    for t in range(4):
        inner, background = block_masks(corners, t)
        vx, vy = mv[t, 0][inner], mv[t, 1][inner]
        close = ((vx - dx).abs() <= 1) & ((vy - dy).abs() <= 1)
        assert close.float().mean() >= 0.75, f"step {t}: codec vectors {list(zip(vx.tolist(), vy.tolist()))}"
        assert (torch.sign(vx) == np.sign(dx)).float().mean() >= 0.75
        assert (torch.sign(vy) == np.sign(dy)).float().mean() >= 0.75
        assert (mv[t][:, background].abs() <= 0.5).float().mean() >= 0.9
        # codec vectors and block matching on the decoded frames point the same way
        agree = ((mv[t] - bm[t]).abs() <= 1).all(dim=0)[inner]
        assert agree.float().mean() >= 0.75


def test_codec_motion_accumulates_over_sampled_frames():
    frames, corners = moving_square(2, -1, t=7, kind="smooth")
    data = encode_video(frames)
    full = decode_video(data, export_mvs=True).motion
    clip = decode_video(data, num_frames=4, sampling="stride", stride=2, export_mvs=True)
    assert clip.indices.tolist() == [0, 2, 4, 6] and tuple(clip.motion.shape) == (3, 2, 6, 6)
    assert torch.allclose(clip.motion, full[0::2] + full[1::2])
    inner, _ = block_masks([corners[0], corners[2]], 0)
    assert (clip.motion[0, 0][inner] == 4).float().mean() >= 0.75
    assert (clip.motion[0, 1][inner] == -2).float().mean() >= 0.75
    single = decode_video(data, num_frames=4, sampling="stride", stride=2, export_mvs=True, thread_type="NONE")
    assert torch.equal(single.frames, clip.frames) and torch.equal(single.motion, clip.motion)
    repeat = decode_video(data, num_frames=10, export_mvs=True)  # 7 frames, 10 asked: repeats give zero steps
    same = repeat.indices[1:] == repeat.indices[:-1]
    assert same.any() and (repeat.motion[same] == 0).all()


# ---------------------------------------------------------------------------------------------------- tokenizers
def test_motion_tokens_from_frames_equal_tokens_from_the_field():
    torch.manual_seed(0)
    frames, _ = moving_square(3, 2, t=4)
    x = normalize_frames(torch.from_numpy(frames))
    tok = MotionTokens(embed_dim=16, patch_size=2, t_patch=2, img_size=SIZE, num_frames=4)
    out = tok(x)
    assert isinstance(out, Tokens) and out.modality == "motion"
    assert out.grid == (2, 3, 3) and out.num_tokens == 18 == tok.num_tokens(4, SIZE, SIZE)
    assert out.pos[0, -1].tolist() == [1.0, 2.0, 2.0]
    field = block_matching(x)
    assert torch.equal(tok(motion=field).x, out.x)
    # manual: zero step prepended, scaled by search, Conv3d, VideoMAE sinusoid table
    from tokenizers_mm.video import sinusoid_table

    padded = torch.cat([torch.zeros(1, 1, 2, 6, 6), field / 7.0], dim=1)
    ref = tok.proj(padded.transpose(1, 2)).flatten(2).transpose(1, 2) + sinusoid_table(18, 16)
    assert torch.allclose(out.x, ref, atol=1e-6)


def test_motion_tokens_codec_source_and_masks():
    frames, _ = moving_square(-2, 5, t=5, kind="smooth")
    data = encode_video(frames)
    a = decode_video(data, num_frames=5, export_mvs=True)
    b = decode_video(data, num_frames=3, sampling="stride", stride=2, export_mvs=True)
    batch, mask, motion = collate_clips([a, b], num_frames=6)
    assert tuple(motion.shape) == (2, 5, 2, 6, 6)
    tok = create_tokenizer("motion", embed_dim=8, patch_size=3, t_patch=2, source="codec")
    with pytest.raises(ValueError, match=r"source='codec'\) needs motion="):
        tok(normalize_frames(batch))
    out = tok(normalize_frames(batch), mask=mask, motion=motion)
    assert out.grid == (3, 2, 2) and tuple(out.x.shape) == (2, 12, 8)
    # pad_first: token k covers frames 2k, 2k+1 and is real if frame 2k is (clip b has 3 real frames)
    assert out.mask.reshape(2, 3, 4)[:, :, 0].tolist() == [[True, True, True], [True, True, False]]
    no_pad = MotionTokens(embed_dim=8, patch_size=1, t_patch=5, pad_first=False, source="codec")
    out2 = no_pad(motion=motion, mask=mask)
    assert out2.grid == (1, 6, 6) and out2.mask.all()  # token 0 leads into frame 1, real in both clips
    with pytest.raises(ValueError, match="do not split into t_patch=2"):
        MotionTokens(embed_dim=8, t_patch=2, pad_first=False)(motion=motion)
    with pytest.raises(ValueError, match="multiple of patch_size=4"):
        MotionTokens(embed_dim=8, patch_size=4)(motion=motion[:, :3])
    with pytest.raises(ValueError, match="steps but frames have T=4"):
        tok(torch.zeros(2, 4, 3, SIZE, SIZE), motion=motion)
    with pytest.raises(ValueError, match="at least 2 frames"):
        MotionTokens(embed_dim=8, patch_size=1, t_patch=1)(torch.zeros(1, 1, 3, 32, 32))


def test_keyframe_motion_layout_counts_and_positions():
    torch.manual_seed(0)
    frames, _ = moving_square(3, -2, t=8)
    x = normalize_frames(torch.from_numpy(frames))
    tok = create_tokenizer(
        "keyframe_motion", img_size=SIZE, num_frames=8, patch_size=16, embed_dim=16, motion_patch=2, class_token=True
    )
    assert isinstance(tok, KeyframeMotion)
    out = tok(x)
    k, m = 36, 4 * 9  # 6x6 keyframe patches; T''=8/2, 3x3 motion tokens
    assert out.num_tokens == 1 + k + m == tok.num_tokens(8, SIZE, SIZE)
    assert out.grid is None and out.num_prefix == 1 and out.modality == "video"
    # the keyframe part equals ImagePatches on frame 0 (the type embedding starts at zero)
    img = tok.keyframe(x[:, 0])
    assert torch.equal(out.x[:, 1 : 1 + k], img.x)
    assert torch.equal(out.x[:, 1 + k :], tok.motion(x).x)
    pos = out.pos[0]
    assert pos[0].tolist() == [-1.0, -1.0, -1.0]
    assert (pos[1 : 1 + k, 0] == 0).all() and pos[1 + k - 1].tolist() == [0.0, 5.0, 5.0]
    # motion token (t''=0, 0, 0) covers frames 0-1 and keyframe patches 0-1: centre (0.5, 0.5, 0.5)
    assert pos[1 + k].tolist() == [0.5, 0.5, 0.5] and pos[-1].tolist() == [6.5, 4.5, 4.5]
    tubelets = VideoTubelets(img_size=SIZE, num_frames=8, embed_dim=16)
    assert out.num_tokens < tubelets.num_tokens(8, SIZE, SIZE)


def test_keyframe_motion_mask_and_errors():
    tok = KeyframeMotion(img_size=32, num_frames=4, embed_dim=8, motion_patch=1, type_embed=False)
    x = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    out = tok(x, mask=mask)
    assert out.num_tokens == 4 + 2 * 4 and out.num_prefix == 0
    assert out.mask.tolist() == [[True] * 12, [True] * 8 + [False] * 4]
    assert not hasattr(ImagePatches, "motion")
    with pytest.raises(ValueError, match="at least 2 frames"):
        tok(x[:, :1])
    with pytest.raises(ValueError, match="expects 3 channels"):
        tok(x[:, :, :1])
