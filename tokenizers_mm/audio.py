"""Audio tokenizers: batched Kaldi filterbanks, AST patches (`audio_patches`) and stacked frames (`audio_frames`).

`fbank` computes exactly what `torchaudio.compliance.kaldi.fbank` computes, but for a whole batch ``[B, S]`` at
once on the waveform's device (frames via ``unfold``/one gather, vectorised DC removal / pre-emphasis / window,
one ``rfft``, one mel matmul). `fbank_with_lengths` handles right-padded variable-length batches: the valid frames
of every sample equal torchaudio's output on the unpadded sample (Kaldi's DC removal and pre-emphasis act per frame,
so padding never leaks into a valid frame), and frames past a sample's end are zero.

Dither: Kaldi adds ``dither * N(0, 1)`` noise per frame sample. With ``dither > 0`` the noise is drawn from
``generator`` if one is given, else from the global RNG (``torch.randn``); it is statistically the same as
torchaudio's but not bit-identical (torchaudio draws per sample, we draw once for the batch). Use ``dither=0.0``
for reproducible features (all the tokenizers below do).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
import torchaudio.functional as AF
from timm.layers import resample_abs_pos_embed, trunc_normal_
from torch import nn
from torchaudio.compliance import kaldi as _kaldi

from .checks import check_input
from .registry import register_tokenizer
from .tokens import Tokens

__all__ = ["fbank", "fbank_with_lengths", "num_fbank_frames", "remove_waveform_mean", "AudioPatches", "AudioFrames"]

_MS = 0.001
# Kaldi / torchaudio floor every log at float32's epsilon, whatever the dtype.
_EPS = float(torch.finfo(torch.float32).eps)
# CPU chunk size (elements of the [rows, T, padded_window] frame tensor) that keeps intermediates in cache.
_CPU_CHUNK_ELEMS = 1 << 20
#: A 2-D waveform whose last dimension is at most this and smaller than the first looks channels-last ``[S, C]``.
_MAX_CHANNELS = 8


def _frame_sizes(sample_frequency: float, frame_length: float, frame_shift: float, round_pow2: bool):
    shift = int(sample_frequency * frame_shift * _MS)
    size = int(sample_frequency * frame_length * _MS)
    padded = _kaldi._next_power_of_2(size) if round_pow2 else size
    if size < 2:
        raise ValueError(
            f"frame_length {frame_length} ms at {sample_frequency} Hz gives a window of {size} samples (< 2)"
        )
    if shift <= 0:
        raise ValueError(f"frame_shift {frame_shift} ms at {sample_frequency} Hz gives a shift of {shift} samples")
    if padded % 2:
        raise ValueError(
            f"the padded window ({padded} samples) must be even: use round_to_power_of_two or change frame_length"
        )
    return size, shift, padded


def num_fbank_frames(
    num_samples: int | torch.Tensor,
    sample_rate: float = 16000.0,
    frame_length: float = 25.0,
    frame_shift: float = 10.0,
    snip_edges: bool = True,
) -> int | torch.Tensor:
    """Kaldi's frame count for ``num_samples`` (an int or an integer tensor of lengths)."""
    size = int(sample_rate * frame_length * _MS)
    shift = int(sample_rate * frame_shift * _MS)
    if snip_edges:
        if isinstance(num_samples, torch.Tensor):
            return torch.where(num_samples < size, 0, 1 + (num_samples - size).clamp_min(0) // shift)
        return 0 if num_samples < size else 1 + (num_samples - size) // shift
    return (num_samples + shift // 2) // shift


@functools.lru_cache(maxsize=32)
def _mel_matrix(num_bins, padded, sample_frequency, low_freq, high_freq, vtln_low, vtln_high, vtln_warp):
    """``[padded // 2 + 1, num_bins]`` mel filterbank (torchaudio's `get_mel_banks`, zero Nyquist column)."""
    banks, _ = _kaldi.get_mel_banks(
        num_bins, padded, sample_frequency, low_freq, high_freq, vtln_low, vtln_high, vtln_warp
    )
    return F.pad(banks, (0, 1)).T.contiguous()


def _window(window_type: str, size: int, blackman_coeff: float, device, dtype) -> torch.Tensor:
    if window_type not in _kaldi.WINDOWS:
        raise ValueError(f"window_type must be one of {_kaldi.WINDOWS}, got {window_type!r}")
    return _kaldi._feature_window_function(window_type, size, blackman_coeff, device, dtype)


def _check_waveform(waveform: torch.Tensor, name: str = "fbank", allow_nonfinite: bool = True) -> torch.Tensor:
    """A mono waveform ``[S]`` or ``[B, S]`` as ``[B, S]`` (`check_input`: a tensor, not empty, floating point; NaN /
    inf refused unless `allow_nonfinite`); a ``[S, C]`` that looks channels-last is refused with the layout."""
    layout = "a mono waveform [B, S] or [S]"
    waveform = check_input(
        waveform,
        name,
        layout,
        ndim=(1, 2),
        allow_nonfinite=allow_nonfinite,
        integer_hint="convert it to float in [-1, 1] first (int16 PCM: x.float() / 32768)",
    )
    if waveform.dim() == 2 and waveform.shape[1] <= _MAX_CHANNELS < waveform.shape[0]:
        raise ValueError(
            f"{name} expects {layout}; shape {tuple(waveform.shape)} looks like {waveform.shape[1]}-channel audio "
            f"[S, C] (channels last): mix it down (x.mean(-1)) or pick a channel (x[:, 0]) first"
        )
    return waveform if waveform.dim() == 2 else waveform.unsqueeze(0)


def fbank_with_lengths(
    waveform: torch.Tensor,
    sample_rate: float = 16000.0,
    lengths: torch.Tensor | None = None,
    *,
    blackman_coeff: float = 0.42,
    dither: float = 0.0,
    energy_floor: float = 1.0,
    frame_length: float = 25.0,
    frame_shift: float = 10.0,
    high_freq: float = 0.0,
    htk_compat: bool = False,
    low_freq: float = 20.0,
    num_mel_bins: int = 23,
    preemphasis_coefficient: float = 0.97,
    raw_energy: bool = True,
    remove_dc_offset: bool = True,
    round_to_power_of_two: bool = True,
    snip_edges: bool = True,
    subtract_mean: bool = False,
    use_energy: bool = False,
    use_log_fbank: bool = True,
    use_power: bool = True,
    vtln_high: float = -500.0,
    vtln_low: float = 100.0,
    vtln_warp: float = 1.0,
    window_type: str = _kaldi.POVEY,
    sample_frequency: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched Kaldi fbank of a right-padded batch: ``(feats [B, T, F], frame_lengths [B] long)``.

    Arguments and defaults are those of `torchaudio.compliance.kaldi.fbank` (``sample_frequency`` is accepted as
    an alias of ``sample_rate``); ``F = num_mel_bins + use_energy``. ``lengths [B]`` gives the number of real
    samples of each row (``None``: all ``S``). Frames ``t < frame_lengths[b]`` equal torchaudio's output on
    ``waveform[b, :lengths[b]]`` (``subtract_mean`` averages over those frames only); the rest are zero.
    Half-precision input is computed in float32 (returned in float32). See the module doc for ``dither``.
    """
    if sample_frequency is not None:
        if sample_rate not in (16000.0, sample_frequency):
            raise ValueError(f"sample_rate={sample_rate} and sample_frequency={sample_frequency} disagree")
        sample_rate = sample_frequency
    sample_rate = float(sample_rate)
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be > 0, got {sample_rate}")
    if not 0.0 <= preemphasis_coefficient <= 1.0:
        raise ValueError(f"preemphasis_coefficient must be in [0, 1], got {preemphasis_coefficient}")
    x = _check_waveform(waveform)
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    b, s = x.shape
    device = x.device
    size, shift, padded = _frame_sizes(sample_rate, frame_length, frame_shift, round_to_power_of_two)
    if lengths is not None:
        lengths = torch.as_tensor(lengths, device=device)
        if lengths.dim() != 1 or lengths.shape[0] != b or lengths.is_floating_point() or lengths.is_complex():
            raise ValueError(f"lengths must be an integer tensor [B={b}], got {lengths.dtype} {tuple(lengths.shape)}")
        lengths = lengths.long()
        lmin, lmax = int(lengths.min()), int(lengths.max())
        if lmax > s:
            raise ValueError(f"lengths must be <= the padded length S={s}, got max {lmax}")
        if lmin < size:
            raise ValueError(
                f"audio too short: a sample has {lmin} samples, fewer than one {frame_length} ms frame ({size} samples)"
            )
    elif s < size:
        raise ValueError(f"audio too short: {s} samples, fewer than one {frame_length} ms frame ({size} samples)")

    opts = dict(
        blackman_coeff=blackman_coeff,
        dither=dither,
        energy_floor=energy_floor,
        frame_length=frame_length,
        frame_shift=frame_shift,
        high_freq=high_freq,
        htk_compat=htk_compat,
        low_freq=low_freq,
        num_mel_bins=num_mel_bins,
        preemphasis_coefficient=preemphasis_coefficient,
        raw_energy=raw_energy,
        remove_dc_offset=remove_dc_offset,
        snip_edges=snip_edges,
        subtract_mean=subtract_mean,
        use_energy=use_energy,
        use_log_fbank=use_log_fbank,
        use_power=use_power,
        vtln_high=vtln_high,
        vtln_low=vtln_low,
        vtln_warp=vtln_warp,
        window_type=window_type,
    )
    # One pass over the whole batch. On CPU, huge [B, T, 512] intermediates fall out of cache and run slower than
    # torchaudio's per-sample loop, so there the batch is processed in cache-sized chunks of rows (same result).
    m = num_fbank_frames(s, sample_rate, frame_length, frame_shift, snip_edges)
    rows = b if device.type != "cpu" else max(1, _CPU_CHUNK_ELEMS // max(1, m * padded))
    if rows >= b:
        return _fbank_impl(x, lengths, sample_rate, size, shift, padded, generator, opts)
    outs = [
        _fbank_impl(
            x[i : i + rows],
            None if lengths is None else lengths[i : i + rows],
            sample_rate,
            size,
            shift,
            padded,
            generator,
            opts,
        )
        for i in range(0, b, rows)
    ]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def _fbank_impl(x, lengths, sample_rate, size, shift, padded, generator, opts):
    b, s = x.shape
    device, dtype = x.device, x.dtype
    blackman_coeff = opts["blackman_coeff"]
    dither = opts["dither"]
    energy_floor = opts["energy_floor"]
    frame_length = opts["frame_length"]
    frame_shift = opts["frame_shift"]
    high_freq = opts["high_freq"]
    htk_compat = opts["htk_compat"]
    low_freq = opts["low_freq"]
    num_mel_bins = opts["num_mel_bins"]
    preemphasis_coefficient = opts["preemphasis_coefficient"]
    raw_energy = opts["raw_energy"]
    remove_dc_offset = opts["remove_dc_offset"]
    snip_edges = opts["snip_edges"]
    subtract_mean = opts["subtract_mean"]
    use_energy = opts["use_energy"]
    use_log_fbank = opts["use_log_fbank"]
    use_power = opts["use_power"]
    vtln_high = opts["vtln_high"]
    vtln_low = opts["vtln_low"]
    vtln_warp = opts["vtln_warp"]
    window_type = opts["window_type"]
    # ---- frames [B, M, W]
    if snip_edges:
        frames = x.unfold(-1, size, shift)
    else:
        m = (s + shift // 2) // shift
        pad = size // 2 - shift // 2
        p = torch.arange(m, device=device).unsqueeze(1) * shift - pad + torch.arange(size, device=device)
        n = lengths.view(b, 1, 1) if lengths is not None else s
        # Kaldi's reflection repeats the edge sample: [..., 1, 0 | 0, 1, ...] and [..., L-1 | L-1, L-2, ...].
        p = torch.where(p < 0, -p - 1, p)
        p = torch.where(p >= n, 2 * n - 1 - p, p)
        if lengths is not None:  # frames past a short row's end are dropped later; keep their indices in range
            p = p.clamp(0, s - 1)
        frames = x[:, p] if lengths is None else x.gather(1, p.reshape(b, -1)).view(b, m, size)
    frame_lengths = num_fbank_frames(
        lengths if lengths is not None else torch.full((b,), s, device=device),
        sample_rate,
        frame_length,
        frame_shift,
        snip_edges,
    )

    if dither != 0.0:
        noise = torch.randn(frames.shape, generator=generator, device=device, dtype=dtype)
        frames = frames + noise * dither
    if remove_dc_offset:
        frames = frames - frames.mean(-1, keepdim=True)
    energy = None
    if use_energy and raw_energy:
        energy = frames.pow(2).sum(-1)
    if preemphasis_coefficient != 0.0:
        c = preemphasis_coefficient
        frames = torch.cat([frames[..., :1] - c * frames[..., :1], frames[..., 1:] - c * frames[..., :-1]], dim=-1)
    frames = frames * _window(window_type, size, blackman_coeff, device, dtype)
    if use_energy and not raw_energy:
        energy = frames.pow(2).sum(-1)

    spec = torch.fft.rfft(frames, n=padded)  # zero-pads each frame to `padded`
    spec = torch.view_as_real(spec).pow(2).sum(-1) if use_power else spec.abs()
    mel = _mel_matrix(
        int(num_mel_bins), padded, sample_rate, float(low_freq), float(high_freq), vtln_low, vtln_high, vtln_warp
    )
    feats = torch.matmul(spec, mel.to(device=device, dtype=dtype))  # [B, M, num_mel_bins]
    if use_log_fbank:
        feats = feats.clamp_min(_EPS).log()
    if energy is not None:
        energy = energy.clamp_min(_EPS).log()
        if energy_floor != 0.0:
            energy = energy.clamp_min(math.log(energy_floor))
        energy = energy.unsqueeze(-1)
        feats = torch.cat([feats, energy] if htk_compat else [energy, feats], dim=-1)

    if lengths is not None or subtract_mean:
        valid = (torch.arange(feats.shape[1], device=device) < frame_lengths.unsqueeze(1)).unsqueeze(-1)
        if subtract_mean:
            mean = (feats * valid).sum(1, keepdim=True) / frame_lengths.view(b, 1, 1).to(dtype)
            feats = feats - mean
        if lengths is not None:
            feats = feats * valid
    return feats, frame_lengths


def fbank(waveform: torch.Tensor, sample_rate: float = 16000.0, **kaldi_kwargs) -> torch.Tensor:
    """Batched `torchaudio.compliance.kaldi.fbank`: ``waveform [B, S]`` or ``[S]`` -> ``[B, T, F]``.

    Same keyword arguments, defaults and output as torchaudio's (per row), computed for the whole batch at once
    on the waveform's device. Accepts ``lengths=`` and ``generator=`` like `fbank_with_lengths` (which also
    returns the frame counts). Raises ``ValueError`` for a bad shape or audio shorter than one frame and
    ``TypeError`` for a non-float waveform.
    """
    return fbank_with_lengths(waveform, sample_rate, **kaldi_kwargs)[0]


def _lengths_from_mask(lengths: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor | None:
    """Valid lengths from a right-padding mask ``[B, S]`` (True = real sample or frame), as the data loader collates.

    A mask with a real entry after padding (not right-padded) is an error: lengths cannot describe it."""
    if mask is None:
        return lengths
    if lengths is not None:
        raise ValueError("pass either lengths or mask, not both")
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool [B, S] padding mask, got {mask.dtype} {tuple(mask.shape)}")
    lengths = mask.sum(1)
    if not torch.equal(mask, torch.arange(mask.shape[1], device=mask.device) < lengths.unsqueeze(1)):
        raise ValueError("mask must be right-padded (all real entries first): lengths cannot describe it")
    return lengths


def _prepare_waveform(
    waveform: torch.Tensor,
    lengths: torch.Tensor | None,
    sample_rate: float | None,
    expected: float,
    resample: bool,
    name: str,
    allow_nonfinite: bool = False,
):
    """Check the waveform (`_check_waveform`) and the sample rate; resample (and rescale ``lengths``) if allowed."""
    waveform = _check_waveform(waveform, name, allow_nonfinite)
    if sample_rate is None or float(sample_rate) == float(expected):
        return waveform, lengths
    if not resample:
        raise ValueError(
            f"{name} expects {expected:g} Hz audio, got sample_rate={sample_rate:g}; resample first or build the "
            f"tokenizer with resample=True (or sample_rate={sample_rate:g})"
        )
    orig, new = int(sample_rate), int(expected)
    if orig != sample_rate or new != expected:
        raise ValueError(f"resampling needs integer sample rates, got {sample_rate} -> {expected}")
    out = AF.resample(waveform, orig, new)
    if lengths is not None:
        lengths = torch.as_tensor(lengths, device=waveform.device)
        lengths = torch.div(lengths.long() * new + orig - 1, orig, rounding_mode="floor").clamp_max(out.shape[-1])
    return out, lengths


AST_FBANK_KWARGS = dict(
    htk_compat=True, use_energy=False, window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10.0
)


def remove_waveform_mean(
    waveform: torch.Tensor, lengths: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``waveform [B, S]`` minus each row's mean over its ``lengths`` real samples (padding zeroed), as AST's
    ``_wav2fbank``; returns the waveform and the lengths as a tensor (or None)."""
    if lengths is None:
        return waveform - waveform.mean(-1, keepdim=True), None
    lengths = torch.as_tensor(lengths, device=waveform.device)
    valid = torch.arange(waveform.shape[-1], device=waveform.device) < lengths.unsqueeze(1)
    mean = (waveform * valid).sum(-1, keepdim=True) / lengths.clamp_min(1).unsqueeze(1).to(waveform.dtype)
    return (waveform - mean) * valid, lengths


@register_tokenizer("audio_patches")
class AudioPatches(nn.Module):
    """Audio Spectrogram Transformer (AST, Gong et al. 2021) tokenizer: fbank -> overlapping 16x16 patches.

    Pipeline (as AST's ``_wav2fbank`` + ``ASTModel``): optional waveform mean removal; Kaldi fbank with AST's
    arguments (``AST_FBANK_KWARGS``: 128 mel, 25/10 ms, hanning, htk_compat, no energy, no dither); zero-pad or
    cut to ``target_frames``; normalise ``(fbank - norm_mean) / (2 * norm_std)`` (AudioSet stats by default);
    ``Conv2d(1, embed_dim, patch_size, stride=(fstride, tstride))`` over the ``[B, 1, F, T]`` spectrogram;
    optional cls and distillation tokens; learned absolute positions (prefix tokens included, as AST/DeiT),
    bilinearly resampled when the patch grid differs from the one they were built for.

    Args:
        embed_dim: token width.
        num_mel_bins: mel bins ``F`` (128 in AST).
        target_frames: frames after pad/cut (1024 = 10.24 s for AudioSet, 512 for ESC-50).
        patch_size, fstride, tstride: conv kernel and strides (10/10 -> grid (12, 101) for 128 x 1024).
        class_token, dist_token: prepend cls (then distillation) tokens.
        pos_embed: ``learned`` or ``none``.
        norm_mean, norm_std: dataset statistics; ``normalize=False`` skips normalisation.
        sample_rate: expected rate (16 kHz). Another ``sample_rate`` passed to `forward` raises ``ValueError``
            unless ``resample=True`` (then `torchaudio.functional.resample` converts it).
        subtract_waveform_mean: remove each waveform's mean first (AST does; Kaldi's per-frame DC removal
            makes this nearly a no-op).
        fbank_kwargs: overrides of the fbank arguments.
        allow_nonfinite: let NaN / infinite input through instead of raising (`tokenizers_mm.checks.check_input`).

    `forward(audio, lengths=None, sample_rate=None, target_frames=None, mask=None)`: ``audio`` is a waveform
    ``[B, S]`` (``lengths`` = real samples per row, or ``mask [B, S]``, the loader's right-padding mask) or a
    precomputed raw (unnormalised) fbank ``[B, T, num_mel_bins]`` (``lengths`` = real frames per row).
    Returns `Tokens` with ``x [B, P + F'*T', D]`` (row-major over
    ``grid = (F', T')``, frequency first as AST), ``pos [B, N, 2] = (freq_idx, time_idx)`` (prefix at (-1, -1)),
    ``num_prefix P``, ``modality "audio"``.

    Mask rule: patch column ``j`` covers frames ``[j * tstride, j * tstride + patch_size)``; it is False (padding)
    iff it holds no real frame, i.e. ``j * tstride >= valid_frames`` where ``valid_frames`` is the fbank's frame
    count (from ``lengths``, or the unpadded fbank length) capped at ``target_frames``. Prefix tokens are True.
    10 s at 16 kHz -> 998 frames -> columns 0..99 real, column 100 (frames 1000..1015) masked.
    """

    def __init__(
        self,
        embed_dim: int = 768,
        num_mel_bins: int = 128,
        target_frames: int = 1024,
        patch_size: int = 16,
        fstride: int = 10,
        tstride: int = 10,
        class_token: bool = True,
        dist_token: bool = False,
        pos_embed: str = "learned",
        norm_mean: float = -4.2677393,
        norm_std: float = 4.5689974,
        normalize: bool = True,
        sample_rate: int = 16000,
        resample: bool = False,
        subtract_waveform_mean: bool = True,
        fbank_kwargs: dict | None = None,
        allow_nonfinite: bool = False,
    ):
        super().__init__()
        self.allow_nonfinite = allow_nonfinite
        if pos_embed not in ("learned", "none"):
            raise ValueError(f"pos_embed must be 'learned' or 'none', got {pos_embed!r}")
        if num_mel_bins < patch_size or target_frames < patch_size:
            raise ValueError(f"num_mel_bins ({num_mel_bins}) and target_frames ({target_frames}) must be >= patch_size")
        self.embed_dim = embed_dim
        self.num_mel_bins = num_mel_bins
        self.target_frames = target_frames
        self.patch_size = patch_size
        self.fstride, self.tstride = fstride, tstride
        self.norm_mean, self.norm_std, self.normalize = norm_mean, norm_std, normalize
        self.sample_rate, self.resample = sample_rate, resample
        self.subtract_waveform_mean = subtract_waveform_mean
        self.fbank_kwargs = {**AST_FBANK_KWARGS, "num_mel_bins": num_mel_bins, **(fbank_kwargs or {})}
        self.proj = nn.Conv2d(1, embed_dim, kernel_size=patch_size, stride=(fstride, tstride))
        self.num_prefix_tokens = int(class_token) + int(dist_token)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if dist_token else None
        self.grid_size = self.patch_grid(target_frames)
        if pos_embed == "learned":
            n = self.num_prefix_tokens + math.prod(self.grid_size)
            self.pos_embed = nn.Parameter(torch.zeros(1, n, embed_dim))
            trunc_normal_(self.pos_embed, std=0.02)
        else:
            self.pos_embed = None
        for tok in (self.cls_token, self.dist_token):
            if tok is not None:
                trunc_normal_(tok, std=0.02)

    def patch_grid(self, frames: int | None = None) -> tuple[int, int]:
        """``(F', T')`` for a spectrogram of ``frames`` frames (default ``target_frames``)."""
        frames = self.target_frames if frames is None else frames
        p = self.patch_size
        return ((self.num_mel_bins - p) // self.fstride + 1, (frames - p) // self.tstride + 1)

    def num_tokens(self, frames: int | None = None) -> int:
        return self.num_prefix_tokens + math.prod(self.patch_grid(frames))

    def compute_fbank(
        self, waveform: torch.Tensor, lengths: torch.Tensor | None = None, sample_rate: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw (unnormalised, unpadded) AST fbank ``[B, T, F]`` and valid frame counts ``[B]``."""
        waveform, lengths = _prepare_waveform(
            waveform, lengths, sample_rate, self.sample_rate, self.resample, "audio_patches", self.allow_nonfinite
        )
        if self.subtract_waveform_mean:
            waveform, lengths = remove_waveform_mean(waveform, lengths)
        return fbank_with_lengths(waveform, self.sample_rate, lengths, **self.fbank_kwargs)

    def _positions(self, grid: tuple[int, int]) -> torch.Tensor | None:
        if self.pos_embed is None or grid == self.grid_size:
            return self.pos_embed
        return resample_abs_pos_embed(
            self.pos_embed,
            new_size=list(grid),
            old_size=list(self.grid_size),
            num_prefix_tokens=self.num_prefix_tokens,
            interpolation="bilinear",
            antialias=False,
        )

    def forward(
        self,
        audio: torch.Tensor,
        lengths: torch.Tensor | None = None,
        sample_rate: float | None = None,
        target_frames: int | None = None,
        mask: torch.Tensor | None = None,
    ) -> Tokens:
        lengths = _lengths_from_mask(lengths, mask)
        target = self.target_frames if target_frames is None else int(target_frames)
        if target < self.patch_size:
            raise ValueError(f"target_frames ({target}) must be >= patch_size ({self.patch_size})")
        if isinstance(audio, torch.Tensor) and audio.dim() == 3:
            layout = f"a fbank [B, T, {self.num_mel_bins}] or a waveform [B, S]"
            feats = check_input(audio, "audio_patches", layout, ndim=3, allow_nonfinite=self.allow_nonfinite)
            if audio.shape[-1] != self.num_mel_bins:
                raise ValueError(f"audio_patches expects {layout}, got shape {tuple(audio.shape)}")
            b, t = feats.shape[:2]
            frame_lengths = (
                torch.full((b,), t, device=feats.device)
                if lengths is None
                else torch.as_tensor(lengths, device=feats.device).long()
            )
            if lengths is not None:  # zero the padding, as the waveform path does
                feats = feats * (torch.arange(t, device=feats.device) < frame_lengths.unsqueeze(1)).unsqueeze(-1)
        else:
            feats, frame_lengths = self.compute_fbank(audio, lengths, sample_rate)
        b, t, _ = feats.shape
        feats = F.pad(feats, (0, 0, 0, target - t)) if t < target else feats[:, :target]
        frame_lengths = frame_lengths.clamp_max(target)
        if self.normalize:
            feats = (feats - self.norm_mean) / (2 * self.norm_std)
        feats = feats.to(self.proj.weight.dtype)
        x = self.proj(feats.transpose(1, 2).unsqueeze(1))  # [B, D, F', T']
        fp, tp = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # [B, F'*T', D], row-major over (F', T')
        prefix = [tok.expand(b, -1, -1) for tok in (self.cls_token, self.dist_token) if tok is not None]
        if prefix:
            x = torch.cat([*prefix, x], dim=1)
        pos_embed = self._positions((fp, tp))
        if pos_embed is not None:
            x = x + pos_embed
        dev = x.device
        col_real = torch.arange(tp, device=dev) * self.tstride < frame_lengths.to(dev).unsqueeze(1)  # [B, T']
        mask = col_real.unsqueeze(1).expand(b, fp, tp).reshape(b, fp * tp)
        mask = torch.cat([torch.ones(b, self.num_prefix_tokens, dtype=torch.bool, device=dev), mask], dim=1)
        rows, cols = torch.meshgrid(
            torch.arange(fp, device=dev, dtype=torch.float32),
            torch.arange(tp, device=dev, dtype=torch.float32),
            indexing="ij",
        )
        pos = torch.stack([rows.flatten(), cols.flatten()], dim=-1)
        pos = torch.cat([torch.full((self.num_prefix_tokens, 2), -1.0, device=dev), pos]).expand(b, -1, -1)
        return Tokens(x=x, mask=mask, pos=pos, grid=(fp, tp), num_prefix=self.num_prefix_tokens, modality="audio")


@register_tokenizer("audio_frames")
class AudioFrames(nn.Module):
    """Stacked fbank frames for LLM speech prompting (Fathullah et al. 2023; SLAM-LLM's ``EncoderProjectorConcat``).

    Kaldi fbank (default 80 mel, 25/10 ms, no dither), then every ``stack`` consecutive frames are concatenated into
    one token of width ``stack * F`` (stride ``stack``; the ``T mod stack`` trailing frames are dropped), then an
    optional ``Linear(stack * F, embed_dim)`` (``embed_dim=None``: no projection).

    `forward(audio, lengths=None, sample_rate=None, mask=None)`: waveform ``[B, S]`` (``lengths`` in samples, or a
    right-padding ``mask [B, S]``) or fbank ``[B, T, F]`` (``lengths`` in frames).
    Returns `Tokens` with ``grid (T // stack,)``, ``pos [B, N, 1]`` = start
    time in seconds of each token's first frame, ``modality "audio"`` and ``mask``: a token is real iff its first
    frame is a real frame (``i * stack < valid_frames``), i.e. False only for tokens made entirely of padding.
    Another ``sample_rate`` raises ``ValueError`` unless ``resample=True``. Any floating dtype is accepted; empty
    batches, channels-last ``[S, C]`` waveforms and NaN / inf values (unless ``allow_nonfinite``) are errors.
    """

    def __init__(
        self,
        num_mel_bins: int = 80,
        stack: int = 4,
        embed_dim: int | None = None,
        frame_shift: float = 10.0,
        sample_rate: int = 16000,
        resample: bool = False,
        fbank_kwargs: dict | None = None,
        allow_nonfinite: bool = False,
    ):
        super().__init__()
        self.allow_nonfinite = allow_nonfinite
        if stack < 1:
            raise ValueError(f"stack must be >= 1, got {stack}")
        self.stack = stack
        self.frame_shift = frame_shift
        self.sample_rate, self.resample = sample_rate, resample
        self.fbank_kwargs = {"num_mel_bins": num_mel_bins, "frame_shift": frame_shift, **(fbank_kwargs or {})}
        self.feat_dim = num_mel_bins + int(bool(self.fbank_kwargs.get("use_energy", False)))
        self.out_dim = embed_dim if embed_dim is not None else stack * self.feat_dim
        self.proj = nn.Linear(stack * self.feat_dim, embed_dim) if embed_dim is not None else None

    def forward(
        self,
        audio: torch.Tensor,
        lengths: torch.Tensor | None = None,
        sample_rate: float | None = None,
        mask: torch.Tensor | None = None,
    ) -> Tokens:
        lengths = _lengths_from_mask(lengths, mask)
        if isinstance(audio, torch.Tensor) and audio.dim() == 3:
            layout = f"a fbank [B, T, {self.feat_dim}] or a waveform [B, S]"
            feats = check_input(audio, "audio_frames", layout, ndim=3, allow_nonfinite=self.allow_nonfinite)
            if audio.shape[-1] != self.feat_dim:
                raise ValueError(f"audio_frames expects {layout}, got shape {tuple(audio.shape)}")
            frame_lengths = (
                torch.full((audio.shape[0],), audio.shape[1], device=audio.device)
                if lengths is None
                else torch.as_tensor(lengths, device=audio.device).long()
            )
        else:
            wav, lengths = _prepare_waveform(
                audio, lengths, sample_rate, self.sample_rate, self.resample, "audio_frames", self.allow_nonfinite
            )
            feats, frame_lengths = fbank_with_lengths(wav, self.sample_rate, lengths, **self.fbank_kwargs)
        b, t, f = feats.shape
        n = t // self.stack
        if n == 0:
            raise ValueError(f"audio too short: {t} frames, fewer than stack={self.stack}")
        x = feats[:, : n * self.stack].reshape(b, n, self.stack * f)
        if self.proj is not None:
            x = self.proj(x.to(self.proj.weight.dtype))
        start = torch.arange(n, device=x.device) * self.stack
        mask = start < frame_lengths.to(x.device).unsqueeze(1)
        pos = (start.to(torch.float32) * (self.frame_shift * _MS)).view(1, n, 1).expand(b, -1, -1)
        return Tokens(x=x, mask=mask, pos=pos, grid=(n,), modality="audio")
