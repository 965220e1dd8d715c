"""Video I/O with PyAV: in-memory mp4 encoding, frame-sampled decoding and codec motion vectors.

`encode_video` writes ``[T, H, W, 3]`` uint8 frames to an mp4 container in memory (MPEG-4 Part 2 by default, so
the decoder can export macroblock motion vectors; ``libx264`` too). `decode_video` reads bytes, a path or a binary
file object, samples frames (``uniform`` or ``stride``), converts only the frames it keeps to RGB, stops decoding
after the last frame it needs, and optionally returns the codec's motion field on the 16x16 macroblock grid.

Motion convention (shared with `tokenizers_mm.motion.block_matching`): the vector ``(dx, dy)`` of macroblock
``(r, c)`` of frame ``t+1`` is the displacement in pixels of the content from frame ``t`` to frame ``t+1``; a square
moving right by 3 px and down by 2 px gives ``(+3, +2)`` on its blocks. FFmpeg exports ``motion_x / motion_scale``
as the offset from the current block to its source in the reference frame (``src = dst + motion / scale``), i.e. the
opposite sign; `decode_video` negates it. MPEG-4 Part 2 exports 16x16 (or 4 x 8x8) vectors in half-pels
(``motion_scale=2``), H.264 partitions down to 4x4 in quarter-pels; partitions are averaged (area-weighted) per
macroblock. Codec vectors are the encoder's rate-distortion choices from a predictive search (EPZS / hex), not
true motion: they follow it closely on natural, smooth content, but on high-frequency noise textures (and on the
first P frame, which has no predictors) they can miss; a wider search (e.g. ``encode_video(..., dia_size=4)``)
helps MPEG-4.

Every decoding failure (empty input, not a container, no video stream, corrupt data, zero frames) raises
`VideoDecodeError` (a `ValueError`) naming what was given and the underlying FFmpeg error.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, BinaryIO

import av
import numpy as np
import torch

from ..errors import MMBlocksError

__all__ = [
    "AUTO_THREADS_MIN_PIXELS",
    "MACROBLOCK",
    "SAMPLING_MODES",
    "VideoClip",
    "VideoDecodeError",
    "collate_clips",
    "decode_video",
    "encode_video",
    "sample_indices",
]

MACROBLOCK = 16
SAMPLING_MODES = ("uniform", "stride")
_ENCODERS = ("mpeg4", "libx264")
_THREAD_TYPES = ("AUTO", "FRAME", "SLICE", "NONE")
AUTO_THREADS_MIN_PIXELS = 1 << 21  # decode work (frames x H x W) from which decode_video's default is frame threads


class VideoDecodeError(MMBlocksError, ValueError):
    """The input could not be decoded as a video (the message says what was given and why)."""


@dataclass
class VideoClip:
    """Decoded, sampled frames of one video.

    Fields:
        frames: uint8 ``[T, H, W, 3]`` RGB frames.
        fps: the stream's average frame rate (``nan`` if the container does not say).
        indices: int64 ``[T]`` index of each returned frame in the source (decode order = display order here).
        motion: float32 ``[T-1, 2, ceil(H/16), ceil(W/16)]`` codec motion field ``(dx, dy)`` in pixels between
            consecutive returned frames (see the module docstring for the sign), or ``None`` unless
            ``export_mvs=True``. A one-frame clip has an empty field ``[0, 2, h, w]``.
        num_source_frames: frames in the whole source video.
    """

    frames: torch.Tensor
    fps: float
    indices: torch.Tensor
    motion: torch.Tensor | None = None
    num_source_frames: int = 0

    @property
    def num_frames(self) -> int:
        return self.frames.shape[0]


# ---------------------------------------------------------------------------------------------------- encode
def _as_uint8_frames(frames: Any) -> np.ndarray:
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"encode_video expects frames [T, H, W, 3] (RGB), got shape {tuple(frames.shape)}")
    if frames.dtype != np.uint8:
        raise TypeError(f"encode_video expects uint8 frames (0..255), got {frames.dtype}")
    t, h, w, _ = frames.shape
    if t < 1:
        raise ValueError("encode_video needs at least one frame, got T=0")
    if h % 2 or w % 2 or h == 0 or w == 0:
        raise ValueError(f"yuv420p needs an even, non-zero frame size, got H={h}, W={w} (crop or pad by one pixel)")
    return np.ascontiguousarray(frames)


def encode_video(
    frames: np.ndarray | torch.Tensor,
    fps: float = 8,
    codec: str = "mpeg4",
    *,
    quality: int | None = None,
    gop_size: int | None = None,
    **options: Any,
) -> bytes:
    """Encode uint8 RGB frames ``[T, H, W, 3]`` (numpy or torch) into mp4 bytes (yuv420p).

    Args:
        frames: uint8 ``[T, H, W, 3]``; H and W must be even (yuv420p).
        fps: frame rate written to the container.
        codec: ``mpeg4`` (default: MPEG-4 Part 2, whose decoder exports motion vectors) or ``libx264``.
        quality: ``mpeg4``: constant quantiser ``qmin = qmax = quality`` in 1..31 (default 2, near lossless);
            ``libx264``: CRF (default 18).
        gop_size: keyframe interval; default ``T`` (only frame 0 is intra, so every later frame carries motion).
        **options: extra FFmpeg codec options (values are turned into strings), e.g. ``preset="fast"``.

    No B-frames are written (every P frame refers to its predecessor, as `decode_video`'s motion field assumes).
    The encoder runs single-threaded with the ``bitexact`` flag, so the same input gives the same bytes.
    """
    arr = _as_uint8_frames(frames)
    if codec not in _ENCODERS:
        raise ValueError(f"codec must be one of {_ENCODERS}, got {codec!r}")
    if codec not in av.codecs_available:
        raise ValueError(f"codec {codec!r} is not available in this PyAV/FFmpeg build")
    if not fps or fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    t, h, w, _ = arr.shape
    rate = Fraction(fps).limit_denominator(1001)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        ctx = stream.codec_context
        ctx.thread_count = 1
        ctx.gop_size = int(gop_size) if gop_size else t
        ctx.max_b_frames = 0
        ctx.flags |= av.codec.context.Flags.bitexact
        opts = {k: str(v) for k, v in options.items()}
        if codec == "mpeg4":
            q = 2 if quality is None else int(quality)
            if not 1 <= q <= 31:
                raise ValueError(f"mpeg4 quality (quantiser) must be in 1..31, got {q}")
            ctx.qmin = ctx.qmax = q
        else:
            opts.setdefault("crf", str(18 if quality is None else quality))
        stream.options = opts
        for frame in arr:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------- sampling
def sample_indices(
    num_source_frames: int, num_frames: int | None = None, sampling: str = "uniform", stride: int = 1, start: int = 0
) -> list[int]:
    """Source frame indices to keep.

    - ``uniform``: ``num_frames`` indices spread evenly over the whole clip, TSN / VideoMAE test-time style:
      ``floor(linspace(0, n - 1, num_frames) + 0.5)`` (round half up; first and last frame always included).
      A clip shorter than ``num_frames`` repeats frames evenly, so exactly ``num_frames`` come back.
    - ``stride``: ``start, start + stride, ...``, ``num_frames`` of them (all remaining if ``None``). A clip that
      ends early gives **fewer** frames (no repeats: a repeated frame would fake zero motion); `collate_clips`
      pads the batch at the end and returns the frame mask.
    """
    n = int(num_source_frames)
    if n < 1:
        raise ValueError(f"cannot sample from a video with {n} frames")
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
    if num_frames is not None and num_frames < 1:
        raise ValueError(f"num_frames must be >= 1 or None (all frames), got {num_frames}")
    if sampling == "uniform":
        if start != 0 or stride != 1:
            raise ValueError("start/stride apply to sampling='stride' only; uniform sampling covers the whole clip")
        if num_frames is None:
            return list(range(n))
        return torch.floor(torch.linspace(0, n - 1, num_frames, dtype=torch.float64) + 0.5).long().tolist()
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if not 0 <= start < n:
        raise ValueError(f"start={start} is outside the video's {n} frames")
    idx = list(range(start, n, stride))
    return idx if num_frames is None else idx[:num_frames]


# ---------------------------------------------------------------------------------------------------- decode
def _describe(source: Any, data: bytes | None) -> str:
    if data is not None:
        return f"{len(data)} bytes starting {data[:16]!r}"
    if isinstance(source, (str, os.PathLike)):
        size = os.path.getsize(source) if os.path.exists(source) else None
        return f"path {os.fspath(source)!r} ({'missing' if size is None else f'{size} bytes'})"
    return f"{type(source).__name__} object"


def _read_source(source: Any) -> tuple[Any, bytes | None]:
    """(what to hand to av.open, the raw bytes if in memory)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return None, data
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise VideoDecodeError(f"cannot decode video: {_describe(source, None)} is not a file")
        return os.fspath(source), None
    if hasattr(source, "read"):
        data = source.read()
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"decode_video expects a binary file object, its read() returned {type(data).__name__}")
        return None, bytes(data)
    raise TypeError(f"decode_video expects bytes, a path or a binary file object, got {type(source).__name__}")


def _open(target: Any, data: bytes | None) -> av.container.InputContainer:
    return av.open(io.BytesIO(data) if data is not None else target, mode="r")


def _mv_field(frame: av.VideoFrame, hb: int, wb: int) -> np.ndarray | None:
    """``[2, hb, wb]`` (dx, dy) of ``frame``'s past-referencing vectors in our sign, or None without vectors."""
    side = frame.side_data.get("MOTION_VECTORS")
    if side is None:
        return None
    mv = side.to_ndarray()
    field = np.zeros((2, hb, wb), np.float32)
    mv = mv[mv["source"] < 0]
    if mv.size == 0:
        return field
    scale = np.maximum(mv["motion_scale"].astype(np.float64), 1.0)
    dx = -mv["motion_x"] / scale
    dy = -mv["motion_y"] / scale
    bw, bh = mv["w"].astype(np.int64), mv["h"].astype(np.int64)
    # dst_x/dst_y are block centres; partitions (16x8, 8x8, 4x4, ...) never straddle a macroblock.
    col = np.minimum(np.maximum((mv["dst_x"].astype(np.int64) - bw // 2) // MACROBLOCK, 0), wb - 1)
    row = np.minimum(np.maximum((mv["dst_y"].astype(np.int64) - bh // 2) // MACROBLOCK, 0), hb - 1)
    idx, area = row * wb + col, (bw * bh).astype(np.float64)
    cover = np.bincount(idx, weights=area, minlength=hb * wb)
    safe = np.where(cover > 0, cover, 1.0)
    field[0] = (np.bincount(idx, weights=area * dx, minlength=hb * wb) / safe).reshape(hb, wb)
    field[1] = (np.bincount(idx, weights=area * dy, minlength=hb * wb) / safe).reshape(hb, wb)
    return field


def _count_frames(target: Any, data: bytes | None) -> int:
    with _open(target, data) as container:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size)


def _decode(
    target: Any,
    data: bytes | None,
    pick: Callable[[int], list[int]],
    export_mvs: bool,
    thread_type: str | None,
    what: str,
    total: int | None = None,
) -> tuple[dict[int, np.ndarray], list[np.ndarray | None], list[int], int, int, float, tuple[int, int]]:
    """Open once, pick indices from the frame count, decode up to the last one.

    Returns kept RGB frames, per-frame motion fields, indices, frame count used, frames decoded, fps, (H, W).
    """
    with _open(target, data) as container:
        if not container.streams.video:
            kinds = [s.type for s in container.streams]
            raise VideoDecodeError(f"cannot decode video from {what}: no video stream (streams: {kinds})")
        stream = container.streams.video[0]
        if total is None:
            total = stream.frames if stream.frames > 0 else _count_frames(target, data)
        if total <= 0:
            raise VideoDecodeError(f"cannot decode video from {what}: the video stream holds no frames")
        indices = pick(total)
        wanted, last = set(indices), max(indices)
        if thread_type is None:
            work = (last + 1) * stream.codec_context.width * stream.codec_context.height
            thread_type = "AUTO" if work >= AUTO_THREADS_MIN_PIXELS else "NONE"
        stream.thread_type = thread_type
        if export_mvs:
            stream.codec_context.options = {"flags2": "+export_mvs"}
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else math.nan
        kept: dict[int, np.ndarray] = {}
        fields: list[np.ndarray | None] = []
        count, size = 0, (0, 0)
        for frame in container.decode(stream):
            i = count
            count += 1
            size = (frame.height, frame.width)
            if export_mvs:
                hb, wb = -(-frame.height // MACROBLOCK), -(-frame.width // MACROBLOCK)
                fields.append(_mv_field(frame, hb, wb))
            if i in wanted:
                kept[i] = frame.to_ndarray(format="rgb24")
            if i >= last:
                break
    return kept, fields, indices, total, count, fps, size


def decode_video(
    source: bytes | str | os.PathLike | BinaryIO,
    num_frames: int | None = None,
    sampling: str = "uniform",
    stride: int = 1,
    export_mvs: bool = False,
    *,
    start: int = 0,
    thread_type: str | None = None,
) -> VideoClip:
    """Decode and sample a video from bytes, a path or a binary file object.

    Args:
        source: mp4 (or any FFmpeg-readable container) as ``bytes``, a path, or a binary file object.
        num_frames: frames to return (``None``: every frame the sampling gives).
        sampling: ``uniform`` or ``stride`` (see `sample_indices` for the exact indices and short clips).
        stride / start: for ``stride`` sampling.
        export_mvs: also return the codec motion field ``[T-1, 2, ceil(H/16), ceil(W/16)]`` (dx, dy) in pixels.
            Between two returned frames ``i < j`` it is the sum of the per-frame fields of source frames
            ``i+1..j`` at the same macroblock (no trajectory tracing); a repeated frame gives zeros. Intra frames,
            intra blocks and blocks without a past-referencing vector contribute 0. Vectors are assumed to refer
            to the previous frame, which holds for streams without B-frames (all of `encode_video`'s); codecs
            that export no vectors give zeros.
        thread_type: FFmpeg decoder threading: ``AUTO`` (frame + slice threads), ``FRAME``, ``SLICE`` or ``NONE``.
            Default (None): ``AUTO`` when the frames to decode hold at least `AUTO_THREADS_MIN_PIXELS` pixels
            (e.g. 32 frames of 256x256), else ``NONE``: starting a frame-thread pool costs more than it saves on
            short, small clips (16 frames of 112x112 decode ~2x faster single-threaded on a 2-core machine), and
            loader workers already decode clips in parallel.
    Returns a `VideoClip`. Decoding stops after the last needed frame; only kept frames are converted to RGB.
    Raises `VideoDecodeError` for anything that is not a decodable video.
    """
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
    if thread_type is not None and thread_type not in _THREAD_TYPES:
        raise ValueError(f"thread_type must be one of {_THREAD_TYPES}, got {thread_type!r}")
    target, data = _read_source(source)
    if data is not None and len(data) == 0:
        raise VideoDecodeError("cannot decode video: got 0 bytes (empty input)")
    what = _describe(source if data is None else None, data)

    def pick(total: int) -> list[int]:
        return sample_indices(total, num_frames, sampling, stride, start)

    try:
        kept, fields, indices, total, count, fps, size = _decode(target, data, pick, export_mvs, thread_type, what)
        if count <= max(indices):
            # The container's frame count was wrong (or frames were undecodable): resample on what decodes.
            if count == 0:
                raise VideoDecodeError(f"cannot decode video from {what}: no frame could be decoded")
            kept, fields, indices, total, count, fps, size = _decode(
                target, data, pick, export_mvs, thread_type, what, total=count
            )
    except VideoDecodeError:
        raise
    except (av.FFmpegError, EOFError, OSError) as err:
        raise VideoDecodeError(f"cannot decode video from {what}: {type(err).__name__}: {err}") from err
    frames = torch.from_numpy(np.stack([kept[i] for i in indices]))
    motion = None
    if export_mvs:
        hb, wb = -(-size[0] // MACROBLOCK), -(-size[1] // MACROBLOCK)
        per_frame = np.stack([f if f is not None else np.zeros((2, hb, wb), np.float32) for f in fields])
        cum = np.concatenate([np.zeros((1, 2, hb, wb), np.float64), np.cumsum(per_frame, axis=0, dtype=np.float64)])
        idx = np.asarray(indices)
        motion = torch.from_numpy((cum[idx[1:] + 1] - cum[idx[:-1] + 1]).astype(np.float32))
    return VideoClip(
        frames=frames,
        fps=fps,
        indices=torch.tensor(indices, dtype=torch.long),
        motion=motion,
        num_source_frames=total,
    )


# ---------------------------------------------------------------------------------------------------- collate
def collate_clips(
    clips: list[VideoClip], num_frames: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Right-pad clips to ``num_frames`` (default: the longest) and stack them.

    Returns ``frames`` uint8 ``[B, T, H, W, 3]`` (padding = zeros), ``mask`` bool ``[B, T]`` (True = real frame)
    and ``motion`` float32 ``[B, T-1, 2, h, w]`` (zeros past each clip's end) if every clip has motion, else
    ``None``. All clips must share H and W; a clip longer than ``num_frames`` is an error (sample it shorter).
    """
    if not clips:
        raise ValueError("collate_clips needs at least one clip")
    sizes = {tuple(c.frames.shape[1:]) for c in clips}
    if len(sizes) != 1:
        raise ValueError(f"clips differ in frame size {sorted(sizes)}; resize them to one size first")
    t_max = max(c.num_frames for c in clips)
    t = t_max if num_frames is None else int(num_frames)
    if t < t_max:
        raise ValueError(f"a clip has {t_max} frames, more than num_frames={t}")
    b = len(clips)
    frames = torch.zeros((b, t, *clips[0].frames.shape[1:]), dtype=torch.uint8)
    mask = torch.zeros((b, t), dtype=torch.bool)
    for i, c in enumerate(clips):
        frames[i, : c.num_frames] = c.frames
        mask[i, : c.num_frames] = True
    motion = None
    if all(c.motion is not None for c in clips):
        motion = torch.zeros((b, max(t - 1, 0), *clips[0].motion.shape[1:]), dtype=torch.float32)
        for i, c in enumerate(clips):
            motion[i, : c.motion.shape[0]] = c.motion
    return frames, mask, motion
