"""Per-modality sample codecs: decode one sample in a loader worker, collate a batch, finish it in the main process.

A codec is the only modality-specific part of the loader (`ShardDataset` / `ShardLoader`)::

    worker:  decode(bytes, ext, key) -> item      (runs under the slot's seeded torch RNG: augmentation is reproducible)
             collate(items)     -> raw batch  (numpy: cheap to pickle through the worker's pipe)
    main:    finish(raw)        -> (inputs, mask, extra)

``inputs`` is what the tokenizer takes, ``mask`` the padding mask of variable-length batches (None when every
sample has the same length), ``extra`` named side inputs (the codec ``motion`` field of a video):

=============  ==========  =======================================  =====================  ========================
codec          shard keys  inputs                                   mask                   extra
=============  ==========  =======================================  =====================  ========================
`ImageCodec`   jpg|png     float32 ``[B, C, H, W]``, normalised     None                   —
`PointsCodec`  npy         float32 ``[B, P, 3 + C]``, zero padded   ``[B, P]`` points      —
`AudioCodec`   flac|wav    float32 ``[B, S]`` mono waveform         ``[B, S]`` samples     —
`VideoCodec`   mp4         float32 ``[B, T, C, H, W]``, normalised  ``[B, T]`` frames      ``motion [B, T-1, 2,
                                                                                           h, w]``
=============  ==========  =======================================  =====================  ========================

Undecodable bytes raise in `decode`; the loader skips and counts the sample (with the reason). Structural problems
that are not corruption (a point cloud with the wrong number of channels) raise a `ValueError` that names the file.

Codecs are registered by modality (`CODECS`, `create_codec`): `build_loader` builds the one its shards need from one
bag of loader options, each codec's `from_options` taking the ones it uses. A new modality is one codec class here (or
in a file of its own) registered with ``@register_codec("name")``.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from webdataset.autodecode import Decoder

from tokenizers_mm.registry import Registry

from .schema import IMAGE_KEYS, MODALITY_KEYS
from .transforms import AUGMENT_PRESETS, BatchNormalizer, ImageDecoder, _mean_std, build_geometry, to_uint8_hwc

__all__ = [
    "CODECS",
    "FRAME_SAMPLINGS",
    "AudioCodec",
    "ImageCodec",
    "PointsCodec",
    "SampleCodec",
    "VideoCodec",
    "augment_presets",
    "create_codec",
    "list_codecs",
    "pad_stack",
    "register_codec",
]

#: Modality name -> codec class (what ``index.json``'s ``modality`` and ``data.modality`` name).
CODECS: Registry[SampleCodec] = Registry("codec")
FRAME_SAMPLINGS: tuple[str, ...] = ("uniform", "stride")


def register_codec(modality: str) -> Any:
    """Class decorator: the codec of `modality` (a `SampleCodec` subclass with a `from_options` classmethod)."""
    return CODECS.register(modality)


def list_codecs() -> list[str]:
    """The modalities the loader reads."""
    return CODECS.names()


def create_codec(modality: str, **options: Any) -> SampleCodec:
    """The codec of `modality` from the loader's options (``train``, ``augment``, ``image_size``, ``channels``,
    ``mean``, ``std``, ``num_points``, ``sample_rate``, ``max_seconds``, ``num_frames``, ``frame_sampling``,
    ``frame_stride``, ``motion_vectors``); each codec takes the ones it uses."""
    return CODECS.get(modality).from_options(**options)


def augment_presets() -> tuple[str, ...]:
    """Every named augmentation preset of every registered codec (``data.augment_policy`` choices)."""
    return tuple(dict.fromkeys(p for m in list_codecs() for p in CODECS.get(m).augment_presets))


def pad_stack(arrays: Sequence[np.ndarray], dtype: Any = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Stack arrays that differ in their first dimension, zero-padding at the end: ``[B, L_max, ...]`` and a bool
    mask ``[B, L_max]`` (True = real), or None when all lengths are equal (no padding, no mask)."""
    lengths = [len(a) for a in arrays]
    longest = max(lengths)
    if all(n == longest for n in lengths):
        return np.stack(arrays).astype(dtype, copy=False) if dtype is not None else np.stack(arrays), None
    first = arrays[0]
    out = np.zeros((len(arrays), longest, *first.shape[1:]), dtype=dtype or first.dtype)
    mask = np.zeros((len(arrays), longest), dtype=bool)
    for i, (a, n) in enumerate(zip(arrays, lengths)):
        out[i, :n] = a
        mask[i, :n] = True
    return out, mask


class RawInputs(NamedTuple):
    """A worker's collated batch: numpy arrays only (``inputs``, optional ``mask`` and named ``extra`` arrays)."""

    inputs: np.ndarray
    mask: np.ndarray | None = None
    extra: dict[str, np.ndarray] | None = None


class SampleCodec:
    """Base class: ``keys`` are the shard keys this codec reads (the first present one is used); `decode` gets the
    bytes, which of the keys they came from (``ext``) and the sample key (for per-sample deterministic choices)."""

    modality: str = ""
    keys: tuple[str, ...] = ()
    #: Named augmentations `augment` accepts besides None / True / False.
    augment_presets: tuple[str, ...] = ()

    @classmethod
    def from_options(cls, **options: Any) -> SampleCodec:
        """The codec from the loader's option bag (see `create_codec`)."""
        raise NotImplementedError

    def decode(self, data: bytes, ext: str, key: str) -> Any:
        raise NotImplementedError

    def collate(self, items: list[Any]) -> RawInputs:
        raise NotImplementedError

    def finish(self, raw: RawInputs, pin_memory: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        """Main process: tensors from the raw batch (numpy -> torch without copies unless a dtype changes)."""
        mask = None if raw.mask is None else torch.from_numpy(raw.mask)
        extra = {k: torch.from_numpy(v) for k, v in (raw.extra or {}).items()}
        inputs = torch.from_numpy(raw.inputs)
        if pin_memory:
            inputs = inputs.pin_memory()
            mask = None if mask is None else mask.pin_memory()
            extra = {k: v.pin_memory() for k, v in extra.items()}
        return inputs, mask, extra


# ------------------------------------------------------------------------------------------------------- images


@register_codec("image")
class ImageCodec(SampleCodec):
    """Encoded images -> torchvision v2 geometry (crop/resize/flip, `build_geometry`) -> uint8 ``[H, W, C]``; the main
    process normalises the whole uint8 batch into float32 ``[B, C, H, W]`` in one op (`BatchNormalizer`)."""

    modality = "image"
    keys = IMAGE_KEYS
    augment_presets = tuple(AUGMENT_PRESETS)

    @classmethod
    def from_options(
        cls,
        *,
        train: bool,
        augment: Any = None,
        image_size: Any = None,
        channels: int = 3,
        mean=None,
        std=None,
        **_: Any,
    ) -> ImageCodec:
        if image_size is None:
            raise ValueError("image shards need image_size")
        return cls(image_size, train=train, augment=augment, channels=channels, mean=mean, std=std)

    def __init__(
        self,
        image_size: int | tuple[int, int],
        *,
        train: bool,
        augment: Any = None,
        channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        self.channels = channels
        self.geometry = build_geometry(image_size, train=train, augment=augment)
        self.decoder = Decoder([ImageDecoder(channels)])
        self.mean, self.std = _mean_std(channels, mean, std)
        self.normalize = BatchNormalizer(self.mean, self.std)

    def decode(self, data: bytes, ext: str, key: str) -> np.ndarray:
        image = self.decoder({"__key__": key, ext: data})[ext]
        return to_uint8_hwc(self.geometry(image), self.channels)

    def collate(self, items: list[np.ndarray]) -> RawInputs:
        return RawInputs(np.stack(items))

    def finish(self, raw: RawInputs, pin_memory: bool = False) -> tuple[torch.Tensor, None, dict]:
        batch, height, width, channels = raw.inputs.shape
        out = torch.empty((batch, channels, height, width), dtype=torch.float32, pin_memory=pin_memory)
        return self.normalize(raw.inputs, out=out), None, {}


# ------------------------------------------------------------------------------------------------------- points

#: Point-MAE / Point-BERT training augmentation (``PointcloudScaleAndTranslate``): per-axis scale and translation.
POINT_AUGMENT_PRESETS: dict[str, dict[str, Any]] = {
    "scale_translate": {"scale": (2 / 3, 3 / 2), "translate": 0.2, "rotate": "none", "jitter": 0.0},
    "rotate": {"scale": (0.8, 1.25), "translate": 0.1, "rotate": "up", "jitter": 0.01},
}


def _rotation_about(axis: int, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    i, j = [a for a in range(3) if a != axis]
    rot = np.eye(3, dtype=np.float32)
    rot[i, i], rot[i, j], rot[j, i], rot[j, j] = c, -s, s, c
    return rot


def _random_rotation(generator: torch.Generator | None = None) -> np.ndarray:
    """A uniformly random rotation (QR of a Gaussian matrix with the sign fix)."""
    g = torch.randn(3, 3, dtype=torch.float64, generator=generator)
    q, r = torch.linalg.qr(g)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q.to(torch.float32).numpy()


@register_codec("points")
class PointsCodec(SampleCodec):
    """``npy`` point clouds ``[P, 3 + C]`` (float32; other float dtypes are converted) -> float32 ``[P', 3 + C]``.

    Args:
        num_points: keep this many points per cloud (a random subset when training, a fixed per-sample subset
            otherwise, seeded by the sample key); clouds with fewer points keep all of them and are padded in the
            batch (``mask``). None keeps every point.
        channels: expected ``3 + C``; None accepts any (>= 3) but a batch must agree.
        augment: None (``scale_translate`` when training, else none), a preset name (`POINT_AUGMENT_PRESETS`:
            ``scale_translate`` = Point-MAE's per-axis scale U(2/3, 3/2) + translation U(-0.2, 0.2); ``rotate`` =
            rotation about the up axis + milder scale + Gaussian jitter), ``none``/False, or a dict with keys
            ``scale`` (low, high), ``translate`` (max abs), ``rotate`` (``none``, ``up``, ``so3``), ``jitter`` (sigma,
            clipped at 5 sigma), ``up_axis`` (default 2 = z).
    Augmentation acts on xyz only; features pass through. Non-finite coordinates make the sample corrupt (skipped).
    """

    modality = "points"
    keys = MODALITY_KEYS["points"]
    augment_presets = tuple(POINT_AUGMENT_PRESETS)

    @classmethod
    def from_options(cls, *, train: bool, augment: Any = None, num_points: int | None = None, **_: Any) -> PointsCodec:
        return cls(num_points, train=train, augment=augment)

    def __init__(self, num_points: int | None = None, *, train: bool, augment: Any = None, channels: int | None = None):
        if num_points is not None and num_points < 1:
            raise ValueError(f"num_points must be >= 1 or None, got {num_points}")
        self.num_points, self.train, self.channels = num_points, train, channels
        self.augment = self._augment_spec(augment, train)

    @staticmethod
    def _augment_spec(augment: Any, train: bool) -> dict[str, Any] | None:
        if augment is None:
            augment = "scale_translate" if train else "none"
        if augment is True:
            augment = "scale_translate"
        if augment is False or augment == "none":
            return None
        if isinstance(augment, str):
            if augment not in POINT_AUGMENT_PRESETS:
                raise ValueError(
                    f"unknown point augment {augment!r} (presets: none, {', '.join(POINT_AUGMENT_PRESETS)})"
                )
            return {"up_axis": 2, **POINT_AUGMENT_PRESETS[augment]}
        if isinstance(augment, dict):
            allowed = {"scale", "translate", "rotate", "jitter", "up_axis"}
            if set(augment) - allowed:
                raise ValueError(f"point augment keys are {sorted(allowed)}, got {sorted(set(augment) - allowed)}")
            spec = {"scale": (1.0, 1.0), "translate": 0.0, "rotate": "none", "jitter": 0.0, "up_axis": 2, **augment}
            if spec["rotate"] not in ("none", "up", "so3"):
                raise ValueError(f"augment rotate must be none, up or so3, got {spec['rotate']!r}")
            return spec
        raise TypeError(f"point augment must be None, a bool, a preset name or a dict, got {type(augment)}")

    def decode(self, data: bytes, ext: str, key: str) -> np.ndarray:
        points = np.load(io.BytesIO(data), allow_pickle=False)
        if points.ndim != 2 or points.shape[1] < 3 or not np.issubdtype(points.dtype, np.floating):
            raise ValueError(f"expected a float point cloud [P, 3 + C], got {points.dtype} {points.shape}")
        if self.channels is not None and points.shape[1] != self.channels:
            raise ValueError(f"expected {self.channels} channels per point, got {points.shape[1]}")
        if len(points) == 0:
            raise ValueError("empty point cloud")
        if not np.isfinite(points).all():
            raise ValueError("non-finite coordinates")
        points = points.astype(np.float32, copy=False)
        if self.num_points is not None and len(points) > self.num_points:
            if self.train:
                keep = torch.randperm(len(points))[: self.num_points].numpy()
            else:  # the same subset every epoch, independent of batch order
                digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
                g = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
                keep = torch.randperm(len(points), generator=g)[: self.num_points].numpy()
            points = points[np.sort(keep)]
        if self.augment is not None:
            points = self._augmented(points.copy())
        return points

    def _augmented(self, points: np.ndarray) -> np.ndarray:
        a = self.augment
        xyz = points[:, :3]
        if a["rotate"] == "up":
            xyz = xyz @ _rotation_about(a["up_axis"], float(torch.rand(()) * 2 * math.pi)).T
        elif a["rotate"] == "so3":
            xyz = xyz @ _random_rotation().T
        low, high = a["scale"]
        if (low, high) != (1.0, 1.0):
            xyz = xyz * (low + (high - low) * torch.rand(3).numpy())
        if a["translate"]:
            xyz = xyz + (torch.rand(3).numpy() * 2 - 1) * a["translate"]
        if a["jitter"]:
            sigma = a["jitter"]
            xyz = xyz + np.clip(torch.randn(xyz.shape).numpy() * sigma, -5 * sigma, 5 * sigma)
        points[:, :3] = xyz.astype(np.float32, copy=False)
        return points

    def collate(self, items: list[np.ndarray]) -> RawInputs:
        widths = {p.shape[1] for p in items}
        if len(widths) > 1:
            raise ValueError(f"point clouds in one batch have different channel counts {sorted(widths)}")
        inputs, mask = pad_stack(items, np.float32)
        return RawInputs(inputs, mask)


# -------------------------------------------------------------------------------------------------------- audio


@register_codec("audio")
class AudioCodec(SampleCodec):
    """``flac|wav`` -> mono float32 waveform at `sample_rate` (resampled with torchaudio when the file differs).

    Args:
        sample_rate: the rate the model expects (16 kHz for the fbank tokenizers).
        max_seconds: crop longer clips (a random window when training, the start otherwise); None keeps all.
        min_seconds: zero-pad shorter clips to this length (default 0.025 s, one Kaldi window, so every clip gives
            at least one fbank frame). An empty file is corrupt (skipped); silence is valid audio.
        gain_db: training augmentation, a random gain in ``[-gain_db, gain_db]`` dB (0 = off).
    Channels are averaged. Batches are zero-padded at the end with ``mask [B, S]``.
    """

    modality = "audio"
    keys = MODALITY_KEYS["audio"]

    @classmethod
    def from_options(
        cls, *, train: bool, augment: Any = None, sample_rate: int = 16000, max_seconds: float | None = None, **_: Any
    ) -> AudioCodec:
        if augment not in (None, False, True) and not isinstance(augment, int | float):
            raise ValueError(f"audio augment is a random gain in dB (a number), got {augment!r}")
        gain = 0.0 if augment in (None, False) else 6.0 if augment is True else float(augment)
        return cls(sample_rate, train=train, max_seconds=max_seconds, gain_db=gain if train else 0.0)

    def __init__(
        self,
        sample_rate: int = 16000,
        *,
        train: bool,
        max_seconds: float | None = None,
        min_seconds: float = 0.025,
        gain_db: float = 0.0,
    ):
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be > 0, got {sample_rate}")
        self.sample_rate, self.train = int(sample_rate), train
        self.max_samples = None if max_seconds is None else max(1, round(max_seconds * sample_rate))
        self.min_samples = max(0, round(min_seconds * sample_rate))
        self.gain_db = gain_db

    def decode(self, data: bytes, ext: str, key: str) -> np.ndarray:
        import soundfile

        wav, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
        if wav.size == 0:
            raise ValueError("empty audio (0 samples)")
        wav = wav.mean(axis=1) if wav.shape[1] > 1 else wav[:, 0]
        if not np.isfinite(wav).all():
            raise ValueError("non-finite audio samples")
        if rate != self.sample_rate:
            import torchaudio.functional as AF

            wav = AF.resample(torch.from_numpy(np.ascontiguousarray(wav)), int(rate), self.sample_rate).numpy()
        if self.max_samples is not None and len(wav) > self.max_samples:
            start = int(torch.randint(len(wav) - self.max_samples + 1, ())) if self.train else 0
            wav = wav[start : start + self.max_samples]
        if len(wav) < self.min_samples:
            wav = np.pad(wav, (0, self.min_samples - len(wav)))
        if self.train and self.gain_db:
            wav = wav * np.float32(10 ** (float((torch.rand(()) * 2 - 1) * self.gain_db) / 20))
        return np.ascontiguousarray(wav, dtype=np.float32)

    def collate(self, items: list[np.ndarray]) -> RawInputs:
        inputs, mask = pad_stack(items, np.float32)
        return RawInputs(inputs, mask)


# -------------------------------------------------------------------------------------------------------- video


@register_codec("video")
class VideoCodec(SampleCodec):
    """``mp4`` -> ``num_frames`` decoded frames (PyAV, `mmblocks.data.video_io.decode_video`) as uint8
    ``[T, H, W, 3]``; the main process normalises the batch into float32 ``[B, T, C, H, W]``.

    Args:
        num_frames: frames per clip (None: all). Clips with fewer frames are padded in the batch (frame ``mask``).
        sampling: ``uniform`` (spread over the clip) or ``stride`` (every `stride`-th frame from the first);
            `mmblocks.data.video_io.sample_indices` says what happens to clips shorter than asked.
        image_size: resize frames to this size (int or ``(H, W)``; None keeps the stored size).
        motion_vectors: also return the codec's motion field (``extra["motion"] [B, T-1, 2, H/16, W/16]``).
        mean, std: normalisation (ImageNet by default).
    No flip or crop augmentation: for motion classes (``moving-digits``) a mirror image changes the label.
    """

    modality = "video"
    keys = MODALITY_KEYS["video"]

    @classmethod
    def from_options(
        cls,
        *,
        train: bool,
        augment: Any = None,
        num_frames: int | None = 16,
        frame_sampling: str = "uniform",
        frame_stride: int = 1,
        image_size: Any = None,
        motion_vectors: bool = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        **_: Any,
    ) -> VideoCodec:
        if augment not in (None, False, "none"):
            raise ValueError(
                f"video loaders have no augmentation (a flip would change a motion class); got augment={augment!r}: "
                "set data.augment=false"
            )
        return cls(
            num_frames,
            train=train,
            sampling=frame_sampling,
            stride=frame_stride,
            image_size=image_size,
            motion_vectors=motion_vectors,
            mean=mean,
            std=std,
        )

    def __init__(
        self,
        num_frames: int | None = 16,
        *,
        train: bool,
        sampling: str = "uniform",
        stride: int = 1,
        image_size: int | tuple[int, int] | None = None,
        motion_vectors: bool = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        if sampling not in FRAME_SAMPLINGS:
            raise ValueError(f"sampling must be one of {FRAME_SAMPLINGS}, got {sampling!r}")
        self.num_frames, self.train, self.sampling, self.stride = num_frames, train, sampling, stride
        self.size = (image_size, image_size) if isinstance(image_size, int) else image_size
        if motion_vectors and self.size is not None:
            raise ValueError(
                "motion_vectors come on the stored frames' 16x16 macroblock grid: keep the stored size "
                "(image_size=None) or compute motion from the resized frames (motion tokenizer source=block_matching)"
            )
        self.motion_vectors = motion_vectors
        self.mean, self.std = _mean_std(3, mean, std)
        self.normalize = BatchNormalizer(self.mean, self.std)

    def decode(self, data: bytes, ext: str, key: str) -> tuple[np.ndarray, np.ndarray | None]:
        from .video_io import decode_video

        kwargs: dict[str, Any] = {"num_frames": self.num_frames, "sampling": self.sampling}
        if self.sampling == "stride":
            kwargs["stride"] = self.stride
        clip = decode_video(data, export_mvs=self.motion_vectors, **kwargs)
        frames = clip.frames
        if self.size is not None and tuple(frames.shape[1:3]) != tuple(self.size):
            resized = torch.nn.functional.interpolate(
                frames.permute(0, 3, 1, 2).float(), size=self.size, mode="bilinear", antialias=True, align_corners=False
            )
            frames = resized.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        motion = None
        if self.motion_vectors:
            if clip.motion is None:
                raise ValueError("the clip has no codec motion vectors")
            motion = clip.motion.numpy()
        return frames.contiguous().numpy(), motion

    def collate(self, items: list[tuple[np.ndarray, np.ndarray | None]]) -> RawInputs:
        frames, mask = pad_stack([f for f, _ in items], np.uint8)
        extra = None
        if self.motion_vectors:
            motion, _ = pad_stack([m for _, m in items], np.float32)
            extra = {"motion": motion}
        return RawInputs(frames, mask, extra)

    def finish(self, raw: RawInputs, pin_memory: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        b, t, h, w, c = raw.inputs.shape
        out = torch.empty((b * t, c, h, w), dtype=torch.float32, pin_memory=pin_memory)
        video = self.normalize(raw.inputs.reshape(b * t, h, w, c), out=out).view(b, t, c, h, w)
        mask = None if raw.mask is None else torch.from_numpy(raw.mask)
        extra = {k: torch.from_numpy(v) for k, v in (raw.extra or {}).items()}
        return video, mask, extra
