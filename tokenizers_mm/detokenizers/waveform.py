"""Spectrogram -> waveform: Griffin-Lim vocoders for torchaudio mel spectrograms and Kaldi fbank, plus the metrics
and the file writer to judge what comes out.

* `GriffinLimVocoder` (``kind="mel"``): torchaudio's own ``InverseMelScale`` then ``GriffinLim``, nothing else, so
  with ``rand_init=False`` the result is bit-identical to calling those two modules with the same settings.
* `GriffinLimVocoder` (``kind="kaldi_fbank"``): inverts what `tokenizers_mm.audio.fbank` (= torchaudio's
  ``compliance.kaldi.fbank``) computes, with Kaldi's own mel banks (``get_mel_banks``, not ``melscale_fbanks``),
  Kaldi's window, FFT size and hop, then undoes the pre-emphasis.
* `spectral_convergence` (Arik et al. 2018; Parallel WaveGAN's ``SpectralConvergenceLoss``) and
  `log_spectral_distance` compare two waveforms through their STFT magnitudes.
* `save_audio` writes a waveform for listening (FLAC by default), peak-normalised.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Literal, get_args

import torch
import torch.nn.functional as F
import torchaudio.functional as AF
from torch import nn
from torchaudio.compliance import kaldi as _kaldi
from torchaudio.transforms import GriffinLim, InverseMelScale

from ..audio import _frame_sizes, _mel_matrix, _window
from ..checks import check_input

__all__ = [
    "KALDI_WINDOWS",
    "SPECTROGRAM_KINDS",
    "SPECTROGRAM_LAYOUTS",
    "GriffinLimVocoder",
    "KaldiWindow",
    "SpectrogramKind",
    "SpectrogramLayout",
    "log_spectral_distance",
    "save_audio",
    "spectral_convergence",
]

SpectrogramKind = Literal["mel", "kaldi_fbank"]
SPECTROGRAM_KINDS: tuple[str, ...] = get_args(SpectrogramKind)
#: ``"btf"``: ``[B, T_frames, n_mels]`` (Kaldi fbank, `AudioPatches.compute_fbank`); ``"bft"``: ``[B, n_mels, T]``
#: (torchaudio ``MelSpectrogram``).
SpectrogramLayout = Literal["btf", "bft"]
SPECTROGRAM_LAYOUTS: tuple[str, ...] = get_args(SpectrogramLayout)
KaldiWindow = Literal["hamming", "hanning", "povey", "rectangular", "blackman"]
KALDI_WINDOWS: tuple[str, ...] = get_args(KaldiWindow)
assert set(KALDI_WINDOWS) == set(_kaldi.WINDOWS), "torchaudio's Kaldi window list changed"

# Kaldi's defaults (torchaudio.compliance.kaldi.fbank / tokenizers_mm.audio.fbank).
_KALDI_DEFAULTS = dict(
    frame_length=25.0,
    frame_shift=10.0,
    round_to_power_of_two=True,
    snip_edges=True,
    f_min=20.0,
    window_type="povey",
    blackman_coeff=0.42,
    preemphasis_coefficient=0.97,
    nnls_iter=100,
)
_MEL_DEFAULTS = dict(n_fft=400, f_min=0.0, norm=None, mel_scale="htk", driver="gels")
_VTLN = (100.0, -500.0, 1.0)  # vtln_low, vtln_high, vtln_warp: Kaldi's defaults (warp 1 = no warping)


def _kaldi_window_fn(window_length: int, *, window_type: str, blackman_coeff: float) -> torch.Tensor:
    """Kaldi's analysis window (the one `tokenizers_mm.audio.fbank` multiplies each frame by), as GriffinLim's
    ``window_fn``."""
    return _window(window_type, window_length, blackman_coeff, torch.device("cpu"), torch.float32)


def _device_type(x: object) -> str:
    return x.device.type if isinstance(x, torch.Tensor) else "cpu"


class GriffinLimVocoder(nn.Module):
    """A mel or Kaldi-fbank spectrogram ``[B, T, n_mels]`` back to a waveform ``[B, samples]`` with Griffin-Lim.

    ``kind="mel"`` (a torchaudio ``MelSpectrogram``): undo the optional normalisation / log, then exactly
    ``torchaudio.transforms.InverseMelScale(n_fft // 2 + 1, n_mels, sample_rate, f_min, f_max, norm, mel_scale,
    driver)`` and ``torchaudio.transforms.GriffinLim(n_fft, n_iter, win_length, hop_length, power=power,
    momentum=momentum, rand_init=rand_init)`` (Hann window, centred frames, as ``MelSpectrogram``'s defaults). No
    other step: the output has GriffinLim's ``(T - 1) * hop_length`` samples unless `forward` gets ``length``.

    ``kind="kaldi_fbank"`` (`tokenizers_mm.audio.fbank`, ``AudioPatches.compute_fbank``, torchaudio's
    ``compliance.kaldi.fbank``), step by step:

    1. undo the normalisation ``(fbank - mean) / (2 * std)`` that `AudioPatches` applies (``mean``/``std`` = its
       ``norm_mean``/``norm_std``), then ``exp`` (``log=True``: Kaldi's log mel energies, floored at float32 eps);
    2. mel -> linear with **Kaldi's** triangular banks (``get_mel_banks``, the matrix `tokenizers_mm.audio` uses;
       its ``padded // 2`` columns padded with a zero Nyquist column to ``n_fft // 2 + 1``): the minimum-norm
       least-squares solution (a pseudo-inverse computed once in float64, i.e. what ``lstsq(driver="gelsd")``
       returns) clamped at 0, then ``nnls_iter`` diagonally preconditioned projected-gradient (FISTA) steps of
       non-negative least squares from there. Not ``InverseMelScale``'s ``gels``: that driver assumes a
       full-rank bank, and Kaldi's is not (128 bins on a 512-point FFT have rank 116: the narrow low filters
       share FFT bins and one holds none). The clamp alone leaves 1-3 % relative error in the mel energies;
       100 NNLS steps bring it to ~1e-7 (speech) .. 3e-5 (a harmonic tone);
    3. ``GriffinLim`` with Kaldi's FFT size (``padded`` = window rounded up to a power of two), window length and
       hop (``frame_length`` / ``frame_shift`` in ms, framed exactly as `tokenizers_mm.audio`), and Kaldi's window
       (``window_type``, default ``povey`` as Kaldi's fbank; ``AudioPatches`` uses ``hanning``: pass it);
    4. undo the pre-emphasis ``y[n] = x[n] - c x[n-1]`` with the IIR ``x[n] = y[n] + c x[n-1]``
       (``torchaudio.functional.lfilter``), then remove the output's mean;
    5. place the result on the input waveform's time axis: Kaldi frame ``t`` is centred on sample
       ``t * hop + win_length // 2`` (``snip_edges=True``; ``t * hop + hop // 2`` otherwise) while Griffin-Lim's
       frames are centred on ``t * hop``, so the output is shifted right by that offset (the leading samples are
       zero) and padded to ``(T - 1) * hop + win_length`` samples (``T * hop`` without snip_edges), the length
       of the shortest waveform that gives ``T`` frames; `forward`'s ``length`` trims or zero-pads the end.

    What cannot be undone (Griffin-Lim aside, which only estimates the phase): dither (noise added before the
    features), the per-frame DC removal (the signal's slow drift is gone), the per-frame pre-emphasis boundary
    (the IIR inverse assumes one continuous pre-emphasised signal), the log floor (energies below float32 eps are
    lost), mel pooling (detail finer than a mel band), ``subtract_mean`` (cepstral mean normalisation) and the
    energy column (``use_energy``: drop it first), and VTLN warping. The padding `AudioPatches` adds before
    normalising is raw fbank 0 = mel energy 1, not silence: cut the spectrogram to its valid frames first.

    Args:
        kind: ``"mel"`` or ``"kaldi_fbank"``.
        sample_rate: Hz.
        n_fft, win_length, hop_length: ``mel``: GriffinLim's (defaults 400, ``n_fft``, ``win_length // 2``).
            ``kaldi_fbank``: derived from ``frame_length``/``frame_shift``/``round_to_power_of_two``; leave them
            None or give the derived values.
        frame_length, frame_shift, round_to_power_of_two, snip_edges: ``kaldi_fbank`` only: Kaldi's framing
            (defaults 25 ms, 10 ms, True, True).
        n_mels: mel bins (Kaldi's ``num_mel_bins``).
        f_min, f_max: band edges in Hz (Kaldi's ``low_freq``/``high_freq``; defaults ``mel`` 0, ``kaldi_fbank``
            20; ``f_max=None``: Nyquist; for ``kaldi_fbank`` a value <= 0 counts back from Nyquist, as Kaldi).
        log: the input is a natural-log spectrogram (default: True for ``kaldi_fbank``, False for ``mel``; a dB
            one from ``AmplitudeToDB``: multiply it by ``ln(10) / 10`` first).
        power: the exponent of the magnitude (2: power spectrum, Kaldi's ``use_power=True``; 1: magnitude).
        n_iter, momentum, rand_init: GriffinLim's (``rand_init`` draws from the global RNG: seed it).
        mean, std: undo ``(spec - mean) / (2 * std)`` (`AudioPatches`'s normalisation); both or neither.
        layout: ``"btf"`` ``[B, T, n_mels]`` (Kaldi, the default) or ``"bft"`` ``[B, n_mels, T]`` (torchaudio).
        window_type, blackman_coeff: ``kaldi_fbank`` only: Kaldi's window (default ``povey``, 0.42).
        preemphasis_coefficient: ``kaldi_fbank`` only: the coefficient to undo (default 0.97; 0 skips it).
        nnls_iter: ``kaldi_fbank`` only: NNLS refinement steps after the clamped pseudo-inverse (default 100).
        norm, mel_scale, driver: ``mel`` only: ``InverseMelScale``'s (match your ``MelSpectrogram``).

    ``forward(spec, length=None) -> [B, samples]`` (a 2-D spectrogram gives ``[samples]``); `to_linear` returns
    the linear spectrogram ``[B, n_fft // 2 + 1, T]`` Griffin-Lim gets; `filterbank` is the ``[n_fft // 2 + 1,
    n_mels]`` mel matrix being inverted. Raises ``ValueError`` / ``TypeError`` for bad options, shapes or values.
    """

    def __init__(
        self,
        kind: SpectrogramKind,
        sample_rate: int = 16000,
        *,
        n_fft: int | None = None,
        win_length: int | None = None,
        hop_length: int | None = None,
        frame_length: float | None = None,
        frame_shift: float | None = None,
        round_to_power_of_two: bool | None = None,
        snip_edges: bool | None = None,
        n_mels: int = 128,
        f_min: float | None = None,
        f_max: float | None = None,
        log: bool | None = None,
        power: float = 2.0,
        n_iter: int = 32,
        momentum: float = 0.99,
        rand_init: bool = True,
        mean: float | None = None,
        std: float | None = None,
        layout: SpectrogramLayout = "btf",
        window_type: KaldiWindow | None = None,
        blackman_coeff: float | None = None,
        preemphasis_coefficient: float | None = None,
        nnls_iter: int | None = None,
        norm: Literal["slaney"] | None = None,
        mel_scale: Literal["htk", "slaney"] | None = None,
        driver: Literal["gels", "gelsy", "gelsd", "gelss"] | None = None,
    ):
        super().__init__()
        if kind not in SPECTROGRAM_KINDS:
            raise ValueError(f"kind must be one of {SPECTROGRAM_KINDS}, got {kind!r}")
        if layout not in SPECTROGRAM_LAYOUTS:
            raise ValueError(f"layout must be one of {SPECTROGRAM_LAYOUTS} (btf = [B, T, n_mels]), got {layout!r}")
        if not sample_rate > 0:
            raise ValueError(f"sample_rate must be > 0, got {sample_rate}")
        if isinstance(n_mels, bool) or not isinstance(n_mels, int) or n_mels < 1:
            raise ValueError(f"n_mels must be a positive int, got {n_mels!r}")
        if not power > 0:
            raise ValueError(f"power must be > 0 (2: power spectrum, 1: magnitude), got {power}")
        if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 0:
            raise ValueError(f"n_iter must be an int >= 0, got {n_iter!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if (mean is None) != (std is None):
            raise ValueError(f"give both mean and std (AudioPatches' norm_mean / norm_std) or neither: {mean=}, {std=}")
        if std is not None and not std > 0:
            raise ValueError(f"std must be > 0, got {std}")
        mel_only = dict(norm=norm, mel_scale=mel_scale, driver=driver)
        kaldi_only = dict(
            frame_length=frame_length,
            frame_shift=frame_shift,
            round_to_power_of_two=round_to_power_of_two,
            snip_edges=snip_edges,
            window_type=window_type,
            blackman_coeff=blackman_coeff,
            preemphasis_coefficient=preemphasis_coefficient,
            nnls_iter=nnls_iter,
        )
        foreign = {k: v for k, v in (kaldi_only if kind == "mel" else mel_only).items() if v is not None}
        if foreign:
            other = "kaldi_fbank" if kind == "mel" else "mel"
            raise ValueError(f"{sorted(foreign)} only apply to kind={other!r}, not kind={kind!r}: leave them unset")

        self.kind = kind
        self.sample_rate = sample_rate
        self.n_mels = n_mels
        self.layout = layout
        self.power = float(power)
        self.log = (kind == "kaldi_fbank") if log is None else bool(log)
        self.mean, self.std = mean, std

        if kind == "mel":
            self.n_fft = _MEL_DEFAULTS["n_fft"] if n_fft is None else int(n_fft)
            self.win_length = self.n_fft if win_length is None else int(win_length)
            self.hop_length = self.win_length // 2 if hop_length is None else int(hop_length)
            self.f_min = _MEL_DEFAULTS["f_min"] if f_min is None else float(f_min)
            self.f_max = f_max
            self._check_stft()
            self.inverse_mel = InverseMelScale(
                self.n_fft // 2 + 1,
                n_mels,
                sample_rate,
                self.f_min,
                f_max,
                norm=norm,
                mel_scale=_MEL_DEFAULTS["mel_scale"] if mel_scale is None else mel_scale,
                driver=_MEL_DEFAULTS["driver"] if driver is None else driver,
            )
            lsq_driver = self.inverse_mel.driver
            rank = int(torch.linalg.matrix_rank(self.inverse_mel.fb.double()))
            if lsq_driver == "gels" and rank < min(self.inverse_mel.fb.shape):
                raise ValueError(
                    f"InverseMelScale's driver 'gels' needs a full-rank mel filterbank, and this one (n_mels={n_mels}, "
                    f"n_fft={self.n_fft}, f_min={self.f_min}, f_max={f_max}) has rank {rank} < {n_mels}: pass "
                    f"driver='gelsd' (CPU; the minimum-norm solution), or fewer n_mels / a larger n_fft"
                )
            self.griffin_lim = GriffinLim(
                self.n_fft,
                n_iter,
                self.win_length,
                self.hop_length,
                power=self.power,
                momentum=momentum,
                rand_init=rand_init,
            )
            self.offset = 0
            return

        opts = {k: (_KALDI_DEFAULTS[k] if v is None else v) for k, v in kaldi_only.items()}
        if opts["window_type"] not in KALDI_WINDOWS:
            raise ValueError(f"window_type must be one of {KALDI_WINDOWS}, got {opts['window_type']!r}")
        if not 0.0 <= opts["preemphasis_coefficient"] <= 1.0:
            raise ValueError(f"preemphasis_coefficient must be in [0, 1], got {opts['preemphasis_coefficient']}")
        if opts["preemphasis_coefficient"] == 1.0:
            raise ValueError("preemphasis_coefficient=1 removes DC exactly: it cannot be inverted (unstable IIR)")
        nnls = opts["nnls_iter"]
        if isinstance(nnls, bool) or not isinstance(nnls, int) or nnls < 0:
            raise ValueError(f"nnls_iter must be an int >= 0, got {nnls!r}")
        if n_mels <= 3:
            raise ValueError(f"Kaldi fbank needs n_mels > 3 (get_mel_banks), got {n_mels}")
        size, shift, padded = _frame_sizes(
            float(sample_rate), opts["frame_length"], opts["frame_shift"], opts["round_to_power_of_two"]
        )
        given = dict(n_fft=n_fft, win_length=win_length, hop_length=hop_length)
        derived = dict(n_fft=padded, win_length=size, hop_length=shift)
        clash = {k: (given[k], derived[k]) for k in given if given[k] is not None and int(given[k]) != derived[k]}
        if clash:
            raise ValueError(
                f"kind='kaldi_fbank' derives n_fft/win_length/hop_length from frame_length={opts['frame_length']} ms, "
                f"frame_shift={opts['frame_shift']} ms, round_to_power_of_two={opts['round_to_power_of_two']} at "
                f"{sample_rate} Hz: {derived}; got (given, derived) {clash}"
            )
        self.n_fft, self.win_length, self.hop_length = padded, size, shift
        nyquist = 0.5 * sample_rate
        self.f_min = _KALDI_DEFAULTS["f_min"] if f_min is None else float(f_min)
        high = 0.0 if f_max is None else float(f_max)
        if not (0.0 <= self.f_min < nyquist and 0.0 < (high if high > 0 else high + nyquist) <= nyquist):
            raise ValueError(f"need 0 <= f_min < f_max <= Nyquist ({nyquist} Hz): f_min={self.f_min}, f_max={f_max}")
        if self.f_min >= (high if high > 0 else high + nyquist):
            raise ValueError(f"need f_min < f_max: f_min={self.f_min}, f_max={f_max} (Nyquist {nyquist} Hz)")
        self.f_max = f_max
        self.window_type, self.blackman_coeff = opts["window_type"], float(opts["blackman_coeff"])
        self.preemphasis_coefficient = float(opts["preemphasis_coefficient"])
        self.snip_edges = bool(opts["snip_edges"])
        self.nnls_iter = nnls
        self._check_stft()
        # `_mel_matrix` is lru-cached and shared: copy it.
        fb = _mel_matrix(n_mels, padded, float(sample_rate), self.f_min, high, *_VTLN).clone()  # [n_freq, n_mels]
        fb64 = fb.double()
        self.register_buffer("fb", fb)
        self.register_buffer("fb_pinv", torch.linalg.pinv(fb64.T).T.float().contiguous())  # [n_mels, n_freq]
        # Per-bin steps 1 / sum_j |fb fb^T|_ij: a diagonal that dominates the Hessian fb fb^T (Gershgorin), so
        # each step decreases the error; far faster than the scalar 1 / ||fb||^2 (filter widths differ ~20x).
        rows = (fb64 @ fb64.T).abs().sum(1)
        step = torch.where(rows > 0, 1.0 / rows.clamp_min(1e-300), torch.zeros_like(rows))
        self.register_buffer("nnls_step", step.float())
        self.griffin_lim = GriffinLim(
            padded,
            n_iter,
            size,
            shift,
            window_fn=functools.partial(
                _kaldi_window_fn, window_type=self.window_type, blackman_coeff=self.blackman_coeff
            ),
            power=self.power,
            momentum=momentum,
            rand_init=rand_init,
        )
        self.offset = size // 2 if self.snip_edges else shift // 2

    def _check_stft(self) -> None:
        if self.n_fft < 2 or not 1 <= self.win_length <= self.n_fft or self.hop_length < 1:
            raise ValueError(
                f"need n_fft >= 2, 1 <= win_length <= n_fft and hop_length >= 1: n_fft={self.n_fft}, "
                f"win_length={self.win_length}, hop_length={self.hop_length}"
            )

    @property
    def filterbank(self) -> torch.Tensor:
        """The ``[n_fft // 2 + 1, n_mels]`` mel matrix being inverted (``mel = linear_spec @ filterbank``)."""
        return self.inverse_mel.fb if self.kind == "mel" else self.fb

    @property
    def min_frames(self) -> int:
        """The fewest frames Griffin-Lim can take (its reflect-padded STFT needs ``(T - 1) * hop > n_fft // 2``)."""
        return self.n_fft // 2 // self.hop_length + 2

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind!r}, sample_rate={self.sample_rate}, n_mels={self.n_mels}, n_fft={self.n_fft}, "
            f"win_length={self.win_length}, hop_length={self.hop_length}, log={self.log}, power={self.power}, "
            f"layout={self.layout!r}" + ("" if self.mean is None else f", mean={self.mean}, std={self.std}")
        )

    def _mel_energies(self, spec: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """``spec`` checked and turned into linear mel energies ``[B, n_mels, T]`` (and whether it was unbatched)."""
        layout = "[B, T, n_mels]" if self.layout == "btf" else "[B, n_mels, T]"
        what = f"a {self.kind} spectrogram {layout} (layout={self.layout!r}, n_mels={self.n_mels})"
        spec = check_input(spec, "GriffinLimVocoder", what, ndim=(2, 3))
        unbatched = spec.dim() == 2
        if unbatched:
            spec = spec.unsqueeze(0)
        mel_dim = 2 if self.layout == "btf" else 1
        if spec.shape[mel_dim] != self.n_mels:
            hint = ""
            if spec.shape[mel_dim] == self.n_mels + 1:
                hint = " (an fbank with use_energy=True has an energy column: drop it first)"
            elif spec.shape[3 - mel_dim] == self.n_mels:
                hint = f" (it looks like the other layout: pass layout={'bft' if self.layout == 'btf' else 'btf'!r})"
            raise ValueError(f"GriffinLimVocoder expects {what}, got shape {tuple(spec.shape)}{hint}")
        frames = spec.shape[3 - mel_dim]
        if frames < self.min_frames:
            raise ValueError(
                f"GriffinLimVocoder needs at least {self.min_frames} frames (n_fft={self.n_fft}, "
                f"hop_length={self.hop_length}), got {frames}"
            )
        dtype = self.griffin_lim.window.dtype
        x = spec.to(dtype)
        if self.layout == "btf":
            x = x.transpose(1, 2)
        if self.mean is not None:
            x = x * (2.0 * self.std) + self.mean
        if self.log:
            big = float(x.max())
            if big > math.log(torch.finfo(dtype).max):
                raise ValueError(
                    f"the log spectrogram reaches {big:.4g}: exp overflows {dtype}. Is it really a natural-log "
                    "spectrogram (log=True)? A normalised one needs mean/std"
                )
            x = x.exp()
        elif float(x.min()) < 0:
            raise ValueError(
                f"a {'power' if self.power == 2 else 'magnitude'} spectrogram must be >= 0, got min "
                f"{float(x.min()):.4g}: pass log=True for a log spectrogram (and mean/std for a normalised one)"
            )
        return x.contiguous(), unbatched

    def _kaldi_to_linear(self, mel: torch.Tensor) -> torch.Tensor:
        """Non-negative least squares ``linear @ fb ~= mel`` over frames: ``mel [B, n_mels, T]`` -> ``[B, n_freq, T]``.

        Start from the clamped minimum-norm solution, then FISTA (projected gradient with Nesterov momentum) with
        the diagonal step ``nnls_step`` (bins no filter covers stay 0)."""
        m = mel.transpose(1, 2)  # [B, T, n_mels]
        fb = self.fb.to(m.dtype)
        step = self.nnls_step.to(m.dtype)
        x = (m @ self.fb_pinv.to(m.dtype)).clamp_min(0.0)  # [B, T, n_freq]
        y, t = x, 1.0
        for _ in range(self.nnls_iter):
            x_new = (y - ((y @ fb - m) @ fb.T) * step).clamp_min(0.0)
            t_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
            y = x_new + ((t - 1.0) / t_new) * (x_new - x)
            x, t = x_new, t_new
        return x.transpose(1, 2).contiguous()

    def to_linear(self, spec: torch.Tensor) -> torch.Tensor:
        """The linear spectrogram ``[B, n_fft // 2 + 1, T]`` (``|STFT| ** power``) that Griffin-Lim receives."""
        with torch.autocast(device_type=_device_type(spec), enabled=False):  # least squares in float32
            return self._to_linear(spec)

    def _to_linear(self, spec: torch.Tensor) -> torch.Tensor:
        mel, unbatched = self._mel_energies(spec)
        linear = self.inverse_mel(mel) if self.kind == "mel" else self._kaldi_to_linear(mel)
        return linear.squeeze(0) if unbatched else linear

    def forward(self, spec: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """``spec`` (see ``layout``) -> waveform ``[B, samples]`` (``[samples]`` for a 2-D ``spec``).

        ``length``: trim or zero-pad the end to this many samples (default: see the class doc). Autocast is switched
        off inside (the least squares, Griffin-Lim and the IIR de-emphasis need float32)."""
        with torch.autocast(device_type=_device_type(spec), enabled=False):
            return self._forward(spec, length)

    def _forward(self, spec: torch.Tensor, length: int | None) -> torch.Tensor:
        if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 1):
            raise ValueError(f"length must be a positive int or None, got {length!r}")
        mel, unbatched = self._mel_energies(spec)
        frames = mel.shape[-1]
        if self.kind == "mel":
            wave = self.griffin_lim(self.inverse_mel(mel))
        else:
            wave = self.griffin_lim(self._kaldi_to_linear(mel))
            c = self.preemphasis_coefficient
            if c:
                a = torch.tensor([1.0, -c], dtype=wave.dtype, device=wave.device)
                b = torch.tensor([1.0, 0.0], dtype=wave.dtype, device=wave.device)
                wave = AF.lfilter(wave, a, b, clamp=False)
            wave = wave - wave.mean(-1, keepdim=True)
            natural = (frames - 1) * self.hop_length + self.win_length if self.snip_edges else frames * self.hop_length
            wave = F.pad(wave, (self.offset, max(0, natural - self.offset - wave.shape[-1])))[..., :natural]
        if length is not None:
            wave = F.pad(wave, (0, length - wave.shape[-1])) if length > wave.shape[-1] else wave[..., :length]
        return wave.squeeze(0) if unbatched else wave


# ---------------------------------------------------------------------------------------------------------- metrics


def _as_batch(x: torch.Tensor, name: str) -> torch.Tensor:
    x = check_input(x, name, "a waveform [B, S] or [S]", ndim=(1, 2))
    return x if x.dim() == 2 else x.unsqueeze(0)


def _pair_magnitudes(pred_wave, target_wave, n_fft, hop_length, win_length, center, name):
    """STFT magnitudes ``[B, F, T]`` of both waveforms, trimmed to the shorter one; float64 (a metric)."""
    pred = _as_batch(pred_wave, name).double()
    target = _as_batch(target_wave, name).double()
    if pred.shape[0] != target.shape[0]:
        if 1 not in (pred.shape[0], target.shape[0]):
            raise ValueError(f"{name}: batch sizes differ: pred {tuple(pred.shape)}, target {tuple(target.shape)}")
        b = max(pred.shape[0], target.shape[0])
        pred, target = pred.expand(b, -1), target.expand(b, -1)
    n = min(pred.shape[-1], target.shape[-1])
    win_length = n_fft if win_length is None else int(win_length)
    hop_length = win_length // 4 if hop_length is None else int(hop_length)
    if n_fft < 2 or not 1 <= win_length <= n_fft or hop_length < 1:
        raise ValueError(f"{name}: need n_fft >= 2, 1 <= win_length <= n_fft, hop_length >= 1")
    if n < (n_fft // 2 + 1 if center else n_fft):
        raise ValueError(f"{name}: the shorter waveform has {n} samples, too few for n_fft={n_fft} (center={center})")
    window = torch.hann_window(win_length, dtype=torch.float64, device=pred.device)

    def mag(x):
        return torch.stft(
            x[:, :n].to(pred.device),
            n_fft,
            hop_length,
            win_length,
            window,
            center=center,
            pad_mode="reflect",
            return_complex=True,
        ).abs()

    return mag(pred), mag(target)


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "none":
        return values
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def spectral_convergence(
    pred_wave: torch.Tensor,
    target_wave: torch.Tensor,
    n_fft: int = 1024,
    hop_length: int | None = 256,
    win_length: int | None = None,
    *,
    center: bool = True,
    reduction: Literal["mean", "none"] = "mean",
) -> torch.Tensor:
    """Spectral convergence ``|| |S_target| - |S_pred| ||_F / || S_target ||_F`` per sample (Arik et al. 2018,
    Parallel WaveGAN's ``SpectralConvergenceLoss``); 0 for identical signals, 1 for silence.

    ``S`` = ``torch.stft`` with a Hann window of ``win_length`` (default ``n_fft``), ``hop_length`` (None:
    ``win_length // 4``), ``center`` (reflect padding), in float64. Waveforms ``[B, S]`` or ``[S]`` (a batch of
    one broadcasts); the longer one is trimmed to the shorter. ``reduction="none"``: ``[B]``; ``"mean"``: the
    mean of the per-sample values (Parallel WaveGAN's loss pools the batch instead; the same for ``B = 1``).
    A target with no spectral energy is a ``ValueError``.
    """
    pred, target = _pair_magnitudes(
        pred_wave, target_wave, n_fft, hop_length, win_length, center, "spectral_convergence"
    )
    den = torch.linalg.vector_norm(target, dim=(-2, -1))
    if bool((den == 0).any()):
        rows = torch.nonzero(den == 0).flatten().tolist()
        raise ValueError(f"spectral_convergence: target row(s) {rows} are silent (zero STFT): the ratio is undefined")
    return _reduce(torch.linalg.vector_norm(target - pred, dim=(-2, -1)) / den, reduction)


def log_spectral_distance(
    pred_wave: torch.Tensor,
    target_wave: torch.Tensor,
    n_fft: int = 1024,
    hop_length: int | None = 256,
    win_length: int | None = None,
    *,
    center: bool = True,
    eps: float = 1e-10,
    reduction: Literal["mean", "none"] = "mean",
) -> torch.Tensor:
    """Log-spectral distance in dB per sample: the mean over frames of
    ``sqrt(mean_f (10 log10(|S_target|^2 + eps) - 10 log10(|S_pred|^2 + eps))^2)``; 0 for identical signals.

    Same STFT, shapes, trimming and ``reduction`` as `spectral_convergence`; ``eps`` floors the power (1e-10 =
    -100 dB, so silent bins do not dominate)."""
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    pred, target = _pair_magnitudes(
        pred_wave, target_wave, n_fft, hop_length, win_length, center, "log_spectral_distance"
    )
    diff = 10.0 * (torch.log10(target.square() + eps) - torch.log10(pred.square() + eps))  # [B, F, T]
    return _reduce(diff.square().mean(-2).sqrt().mean(-1), reduction)


# --------------------------------------------------------------------------------------------------------- writing


def save_audio(
    path: str | os.PathLike,
    waveform: torch.Tensor,
    sample_rate: int,
    *,
    peak: float | None = 0.99,
    subtype: str = "PCM_16",
) -> float:
    """Write ``waveform`` (``[S]`` mono or ``[C, S]`` channels-first, C <= 8) for listening; returns the gain applied.

    With ``peak`` (default 0.99) the signal is scaled so that its largest magnitude is ``peak`` (a silent signal
    is written as is), so it never clips; ``peak=None`` writes it unscaled and refuses values outside [-1, 1].
    The format follows the suffix (``.flac`` recommended, ``.wav``, ``.ogg``), through ``soundfile`` (a dependency
    of mmblocks; `torchaudio.save` if soundfile is missing). Raises ``ValueError`` for a bad shape, rate or value.
    """
    x = check_input(waveform, "save_audio", "a waveform [S] or [C, S]", ndim=(1, 2))
    x = x.detach().to("cpu", torch.float64)
    if x.dim() == 2 and x.shape[0] > 8:
        raise ValueError(f"save_audio expects [S] or channels-first [C, S] with C <= 8, got shape {tuple(x.shape)}")
    if isinstance(sample_rate, bool) or int(sample_rate) != sample_rate or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer, got {sample_rate!r}")
    sample_rate = int(sample_rate)
    top = float(x.abs().max())
    gain = 1.0
    if peak is not None:
        if not 0 < peak <= 1:
            raise ValueError(f"peak must be in (0, 1] or None, got {peak}")
        if top > 0:
            gain = peak / top
    elif top > 1.0:
        raise ValueError(f"the waveform peaks at {top:.4g} > 1 and would clip: pass peak=0.99 to normalise it")
    x = x * gain
    path = os.fspath(path)
    try:
        import soundfile as sf
    except ImportError:  # pragma: no cover - soundfile is a dependency
        import torchaudio

        torchaudio.save(path, (x if x.dim() == 2 else x.unsqueeze(0)).float(), sample_rate)
        return gain
    sf.write(path, (x.T if x.dim() == 2 else x).numpy(), sample_rate, subtype=subtype)
    return gain
