"""Masked reconstruction (MAE, Point-MAE): the encoder sees a random ``1 - mask_ratio`` of its grid tokens and a
detokenizer head (`mmblocks.heads.ReconstructionHead`) predicts the hidden ones; loss and metrics are taken on the
hidden part only.

Metrics, images (in pixel space: the loader's normalisation undone with the task's ``mean`` / ``std``): ``loss``
(MAE's, on the normalised target), ``psnr_hidden`` (dB over the hidden pixels of the pasted reconstruction), and
``psnr_hidden_fill`` (the same for a reconstruction that fills every hidden pixel with the mean colour of the visible
ones: the level a decoder must beat to have learned anything beyond the image's average). A VQ image tokenizer
(``mask_ratio: 0``) hides nothing: both are then taken over every pixel, the fill being each image's mean colour;
``codebook_usage`` and ``perplexity`` of its codes over the split.

Metrics, points: ``loss`` = ``chamfer_l2`` (Point-MAE's, over the hidden groups' local points), ``chamfer_l1``, and
``chamfer_l2_centre`` (every hidden point predicted at its group centre: the level to beat).

Metrics, motion (``mask_ratio: 0``: a VQ motion autoencoder, Video-LaVIT's motion tokenizer, on codec motion):
``loss`` (field MSE in the tokenizer's units + the VQ commitment loss), ``epe`` (endpoint error of the decoded
field, px) against ``epe_zero`` (the zero field's), and the PSNR of the clip rendered from its keyframe by the decoded
motion (``psnr``), by the codec's own motion (``psnr_codec``, the upper bound of a motion-only renderer) and with no
motion (``psnr_still``); ``codebook_usage`` and ``perplexity`` of the codes over the split.

Metrics, waveform (an fbank-patch MAE, Audio-MAE): ``loss`` (patch MSE of the normalised fbank over the hidden
real patches) against ``loss_fill`` (every hidden patch filled with the clip's mean visible value), and the spectral
convergence between the original waveform and Griffin-Lim of the reconstructed fbank (``spectral_convergence``) or of
the true fbank (``spectral_convergence_vocoder``: what the vocoder alone loses) on the first ``sc_clips`` clips; the
report links flac files of a few clips.

Evaluation draws its masks from a generator seeded with ``eval_seed`` at every evaluation, so every checkpoint is
scored on the same masks. The report shows originals, masked inputs and reconstructions as a PNG.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from tokenizers_mm.detokenizers import (
    chamfer_distance,
    endpoint_error,
    psnr,
    save_audio,
    spectral_convergence,
    step_mask,
)
from tokenizers_mm.image import unpatchify
from tokenizers_mm.vq import code_perplexity

from ..data.transforms import default_mean_std
from ..heads import ReconstructionOutput
from .base import Metrics, StepOutput, Task, all_reduce_sum_
from .registry import register_task

__all__ = ["ReconstructionMetrics", "ReconstructionTask", "to_pixels"]


class ReconstructionMetrics(Metrics):
    """Summed loss and the target's figures per sample (`NAMES`), a histogram of the VQ codes used, and the first
    ``examples`` samples kept for the report."""

    NAMES: ClassVar[dict[str, tuple[str, ...]]] = {
        "pixels": ("psnr_hidden", "psnr_hidden_fill"),
        "points": ("chamfer_l1", "chamfer_l2_centre"),
        "motion": ("epe", "epe_zero", "psnr", "psnr_codec", "psnr_still"),
        "waveform": ("loss_fill",),
    }

    def __init__(self, task: ReconstructionTask, device: torch.device):
        self.task = task
        self.names = self.NAMES[task.target_kind]
        self.totals = torch.zeros(2 + len(self.names), dtype=torch.float64, device=device)  # loss, n, figures
        vq = task.vq
        self.code_counts = torch.zeros(vq.codebook_size if vq is not None else 0, dtype=torch.float64, device=device)
        self.generator = torch.Generator().manual_seed(task.eval_seed)
        self.panels: list[Any] = []  # images: [K, C, H, W]; points: (all, visible, reconstruction) point arrays
        self.sc = torch.zeros(3, dtype=torch.float64, device=device)  # waveform: SC sums (reconstruction, vocoder), n
        self.audio: list[tuple[torch.Tensor, ...]] = []  # waveform: (original, vocoded truth, vocoded reconstruction)

    def _add(self, name: str, per_batch_sum: torch.Tensor) -> None:
        self.totals[2 + self.names.index(name)] += per_batch_sum.detach().double()

    def update(self, output: ReconstructionOutput, batch: Any) -> None:
        n = batch.inputs.shape[0]
        self.totals[0] += output.loss.detach().double() * n
        self.totals[1] += n
        if output.codes is not None:
            codes = output.codes[output.codes >= 0]
            self.code_counts += torch.bincount(codes, minlength=self.code_counts.numel()).double()
        if self.task.target_kind == "points":
            self._update_points(output, n)
        elif self.task.target_kind == "motion":
            self._update_motion(output, batch, n)
        elif self.task.target_kind == "waveform":
            self._update_waveform(output, batch, n)
        else:
            self._update_pixels(output, batch.inputs, n)

    def _update_points(self, output: ReconstructionOutput, n: int) -> None:
        hidden = output.masking.hidden
        pred, true = output.pred.float()[hidden], output.groups[hidden]
        self._add("chamfer_l1", chamfer_distance(pred, true, convention="l1") * n)
        self._add("chamfer_l2_centre", chamfer_distance(torch.zeros_like(pred[:, :1]), true, convention="l2") * n)
        for i in range(min(n, self.task.examples - len(self.panels))):
            h = hidden[i]
            absolute = output.groups[i] + output.centers[i][:, None]  # [G, K, 3]
            recon = torch.where(h[:, None, None], output.pred[i].float() + output.centers[i][:, None], absolute)
            self.panels.append(
                (absolute.reshape(-1, 3).cpu(), absolute[~h].reshape(-1, 3).cpu(), recon.reshape(-1, 3).detach().cpu())
            )

    def _update_pixels(self, output: ReconstructionOutput, images: torch.Tensor, n: int) -> None:
        recon, fill, hidden_px = self.task.pixel_views(output, images)
        true = self.task.to_pixels(images)
        self._add("psnr_hidden", _masked_psnr(recon, true, hidden_px).sum())
        self._add("psnr_hidden_fill", _masked_psnr(fill, true, hidden_px).sum())
        for i in range(min(n, self.task.examples - len(self.panels))):
            if output.masking is None:  # a VQ autoencoder: the image and its reconstruction from codes
                self.panels.append(torch.stack([true[i], recon[i]]).detach().cpu())
                continue
            masked = true[i] * (1 - hidden_px[i]) + 0.5 * hidden_px[i]
            self.panels.append(torch.stack([true[i], masked, recon[i]]).detach().cpu())

    def _update_motion(self, output: ReconstructionOutput, batch: Any, n: int) -> None:
        field, pred = batch.extra["motion"].float(), output.pred.float()
        steps = step_mask(batch.mask)
        self._add("epe", endpoint_error(pred, field, steps) * n)
        self._add("epe_zero", endpoint_error(torch.zeros_like(field), field, steps) * n)
        frames = self.task.to_pixels(batch.inputs)  # [B, T, C, H, W] in [0, 1]
        render = self.task.detokenizer.render
        decoded, codec = render(frames[:, 0], pred).clamp(0, 1), render(frames[:, 0], field).clamp(0, 1)
        still = frames[:, :1].expand_as(frames)
        for name, clip in (("psnr", decoded), ("psnr_codec", codec), ("psnr_still", still)):
            self._add(name, psnr(clip[:, 1:].flatten(1, 2), frames[:, 1:].flatten(1, 2)).sum())
        t = frames.shape[1]
        steps = sorted({t // 4, t // 2, t - 1})
        for i in range(min(n, self.task.examples - len(self.panels))):
            self.panels.append(torch.cat([frames[i, steps], codec[i, steps], decoded[i, steps]]).detach().cpu())

    def _update_waveform(self, output: ReconstructionOutput, batch: Any, n: int) -> None:
        dec, hidden, feats, frames = self.task.detokenizer, output.hidden, output.feats, output.frames
        target = dec.target(feats)
        real = dec.real_patches(frames)
        visible = (1 - hidden) * real
        level = (target.mean(-1) * visible).sum(1) / visible.sum(1).clamp_min(1)  # [B] mean of the visible patches
        self._add("loss_fill", dec.loss(feats, level[:, None, None].expand_as(target), hidden, frames) * n)
        take = min(n, self.task.sc_clips - int(self.sc[2].item()))
        if take <= 0:
            return
        scored = hidden * real  # hidden real patches are predicted; visible ones and padding stay true
        recon = dec.spectrogram(output.pred.float(), feats, scored)
        lengths = batch.mask.sum(1) if batch.mask is not None else torch.full((n,), batch.inputs.shape[1])
        for i in range(take):
            original = batch.inputs[i, : int(lengths[i])].float().cpu()
            vocoded, rebuilt = (dec.to_waveform(f[i : i + 1], frames[i : i + 1])[0].cpu() for f in (feats, recon))
            self.sc[0] += float(spectral_convergence(rebuilt, original))
            self.sc[1] += float(spectral_convergence(vocoded, original))
            self.sc[2] += 1
            if len(self.audio) < min(self.task.examples, 4):
                self.audio.append((original, vocoded, rebuilt))
            if len(self.panels) < self.task.examples:
                masked = torch.where(self._hidden_frames(dec, scored[i]).bool(), -1.5, feats[i])  # hidden: darkest
                views = (feats[i], masked, recon[i])  # all target_frames (padding on the right), one width per row
                self.panels.append(torch.stack([((v.T.flip(0) + 1.5) / 3).unsqueeze(0) for v in views]).cpu())

    @staticmethod
    def _hidden_frames(dec: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [L]`` -> ``[T, F]`` 1 where the fbank value lies in a hidden patch."""
        p = dec.patch_size
        grid = unpatchify(hidden.float()[None, :, None].expand(1, -1, p * p), p, dec.grid_size)  # [1, 1, F, T]
        return grid[0, 0].T

    def sync(self) -> None:
        all_reduce_sum_([self.totals, self.code_counts, self.sc])

    def compute(self) -> dict[str, float]:
        loss, n, *figures = self.totals.tolist()
        if n == 0:
            return {"loss": float("nan"), **{k: float("nan") for k in self.names}, "samples": 0}
        out = {"loss": loss / n, **{k: v / n for k, v in zip(self.names, figures)}, "samples": int(n)}
        if self.sc[2] > 0:
            out["spectral_convergence"] = float(self.sc[0] / self.sc[2])
            out["spectral_convergence_vocoder"] = float(self.sc[1] / self.sc[2])
        if self.code_counts.numel():
            out["codebook_usage"] = float((self.code_counts > 0).double().mean())
            out["perplexity"] = float(code_perplexity(self.code_counts))
        return out

    def report(self, out_dir: Path, split: str) -> list[tuple[str, str]]:
        if not self.panels:
            return []
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"reconstructions_{split}.png"
        if isinstance(self.panels[0], tuple):
            save_point_panels(self.panels, path)
            what = "cloud", "groups", "visible groups"
        elif self.task.target_kind == "waveform":
            save_panels(self.panels, path)
            sections = []
            text = (
                f"![reconstructions]({path.name})\n\nRows: {len(self.panels)} {split} clips; columns: the normalised "
                f"Kaldi fbank (low frequencies at the bottom), what the encoder saw ({self.task.mask_ratio:.0%} of the "
                "patches hidden, dark), the reconstruction with the visible patches pasted back.\n"
            )
            sections.append((f"Reconstructions ({split})", text))
            sr = self.task.detokenizer.sample_rate
            rows = ["| clip | original | Griffin-Lim of the true fbank | of the reconstruction |", "|---|---|---|---|"]
            for i, waves in enumerate(self.audio):
                names = [f"audio_{split}_{i}_{w}.flac" for w in ("original", "vocoder", "reconstruction")]
                for name, wave in zip(names, waves):
                    save_audio(out_dir / name, wave, sr)
                rows.append(f"| {i} | " + " | ".join(f"[{n}]({n})" for n in names) + " |")
            sections.append((f"Audio ({split})", "\n".join(rows) + "\n"))
            return sections
        elif self.task.target_kind == "motion":
            save_panels(self.panels, path)
            k = self.panels[0].shape[0] // 3
            text = (
                f"![reconstructions]({path.name})\n\nRows: {len(self.panels)} {split} clips; columns: {k} frames of "
                f"the clip, the same frames rendered from its keyframe by the codec's own motion (the upper bound), "
                f"and by the motion decoded from the {'VQ codes' if self.task.vq is not None else 'tokens'}.\n"
            )
            return [(f"Reconstructions ({split})", text)]
        elif self.panels[0].shape[0] == 2:
            save_panels(self.panels, path)
            text = (
                f"![reconstructions]({path.name})\n\nRows: {len(self.panels)} {split} images; columns: the image and "
                "its reconstruction from its VQ codes.\n"
            )
            return [(f"Reconstructions ({split})", text)]
        else:
            save_panels(self.panels, path)
            what = "image", "patches", "visible patches pasted back; hidden ones grey in the middle column"
        text = (
            f"![reconstructions]({path.name})\n\nRows: {len(self.panels)} {split} samples; columns: the {what[0]}, "
            f"what the encoder saw ({self.task.mask_ratio:.0%} of the {what[1]} hidden), the reconstruction "
            f"({what[2]}).\n"
        )
        return [(f"Reconstructions ({split})", text)]


def to_pixels(
    images: torch.Tensor, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> torch.Tensor:
    """Loader-normalised images ``[..., C, H, W]`` -> [0, 1] pixels: ``x * std + mean`` (default: the loader's own
    default normalisation for C channels), clamped."""
    c = images.shape[-3]
    mean, std = (mean, std) if mean is not None else default_mean_std(c)
    if c != len(mean):
        raise ValueError(f"mean/std are for {len(mean)} channels, the images have {c}")
    m = torch.tensor(mean, device=images.device).view(c, 1, 1)
    s = torch.tensor(std, device=images.device).view(c, 1, 1)
    return (images.float() * s + m).clamp(0, 1)


def _masked_psnr(pred: torch.Tensor, target: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """PSNR per sample ``[B]`` (data range 1) over the pixels where ``where [B, 1, H, W]`` is 1."""
    err = (pred.float() - target.float()).pow(2) * where
    count = (where.expand_as(err)).flatten(1).sum(1).clamp_min(1.0)
    return 10.0 * torch.log10(1.0 / (err.flatten(1).sum(1) / count).clamp_min(1e-10))


def save_panels(panels: Sequence[torch.Tensor], path: Path) -> None:
    """A PNG grid of ``[K, C, H, W]`` panels in [0, 1], one row per entry, upscaled to at least 96 px per image."""
    from PIL import Image

    rows = []
    for row in panels:
        k, c, h, w = row.shape
        img = row.clamp(0, 1).permute(2, 0, 3, 1).reshape(h, k * w, c)  # panels side by side
        img = img.expand(h, k * w, 3) if c == 1 else img
        rows.append(torch.nn.functional.pad(img.permute(2, 0, 1), (0, 0, 0, 1), value=1.0).permute(1, 2, 0))
    grid = (torch.cat(rows, 0).numpy() * 255).round().astype("uint8")
    scale = max(1, 96 // panels[0].shape[-2])
    image = Image.fromarray(grid)
    image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST).save(path)


def save_point_panels(panels: Sequence[tuple[torch.Tensor, ...]], path: Path) -> None:
    """A PNG of point clouds, one row per entry of ``(points [N_i, 3], ...)``, as 3-D scatter plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = len(panels[0])
    fig = plt.figure(figsize=(2.4 * cols, 2.4 * len(panels)))
    for r, row in enumerate(panels):
        lo, hi = row[0].min().item(), row[0].max().item()
        for c, pts in enumerate(row):
            ax = fig.add_subplot(len(panels), cols, r * cols + c + 1, projection="3d")
            ax.scatter(pts[:, 0], pts[:, 2], pts[:, 1], s=1.5, c=pts[:, 1], cmap="viridis")
            ax.set(xlim=(lo, hi), ylim=(lo, hi), zlim=(lo, hi), xticks=[], yticks=[], zticks=[])
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


@register_task("reconstruction")
class ReconstructionTask(Task):
    """MAE pretraining: hide ``mask_ratio`` of the grid tokens, reconstruct them with the ``reconstruction`` head.

    Args:
        mask_ratio: share of grid tokens hidden from the encoder (MAE: 0.75).
        mean / std: the loader's image normalisation, undone for PSNR and pictures (default: the loader's own
            default, ImageNet's for 3 channels and 0.5 / 0.5 otherwise).
        eval_seed: seed of the evaluation masks (the same masks at every evaluation).
        examples: samples shown in the report.
        sc_clips: waveform: clips per split and rank rendered to sound by Griffin-Lim for the spectral convergence
            (it costs two vocoder runs per clip).
    """

    fields = ()
    default_head = "reconstruction"
    monitor = ("loss", "min")
    head_needs_tokenizer = True

    def __init__(
        self,
        mask_ratio: float = 0.75,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        eval_seed: int = 0,
        examples: int = 8,
        sc_clips: int = 64,
    ):
        if not 0.0 <= float(mask_ratio) < 1.0:
            raise ValueError(
                f"mask_ratio must be in [0, 1) (0: nothing hidden, e.g. a VQ motion autoencoder), got {mask_ratio}"
            )
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std (the loader's normalisation) or neither")
        if mean is not None and (len(mean) != len(std) or any(s <= 0 for s in std)):
            raise ValueError(f"mean and std must have one entry per channel and std > 0, got {mean} and {std}")
        self.mask_ratio, self.eval_seed, self.examples = float(mask_ratio), int(eval_seed), int(examples)
        self.sc_clips = int(sc_clips)
        self.mean = None if mean is None else tuple(float(m) for m in mean)
        self.std = None if std is None else tuple(float(s) for s in std)
        self.detokenizer: nn.Module | None = None
        self.target_kind, self.vq = "pixels", None

    def build_head(self, in_dim: int, name: str | None = None, tokenizer: nn.Module | None = None, **kwargs: Any):
        head = super().build_head(in_dim, name, tokenizer=tokenizer, **kwargs)
        self.detokenizer, self.target_kind, self.vq = head.detokenizer, head.target_kind, head.vq
        every_token = self.target_kind == "motion" or self.vq is not None  # autoencoders: nothing hidden
        if every_token and self.mask_ratio:
            vq = " with a VQ bottleneck" if self.vq is not None else ""
            raise ValueError(f"detokenizer {self.target_kind!r}{vq} reconstructs every token: set task.mask_ratio to 0")
        if not every_token and not self.mask_ratio:
            raise ValueError(
                f"detokenizer {self.target_kind!r} reconstructs hidden tokens: task.mask_ratio must be > 0"
            )
        return head

    def _call(self, model: Callable[..., Any], batch: Any, generator: torch.Generator | None, aux: bool) -> Any:
        args, kwargs = self.model_inputs(batch)
        head_inputs = {"target": args[0]}
        if self.target_kind in ("points", "waveform"):
            head_inputs["target_mask"] = kwargs.get("mask")
        elif self.target_kind == "motion":
            if "motion" not in kwargs:
                raise ValueError("detokenizer 'motion' learns codec motion: set data.motion_vectors: true")
            head_inputs = {"target": kwargs["motion"], "target_mask": kwargs.get("mask")}
        return model(
            *args,
            return_aux=aux,
            mask_ratio=self.mask_ratio or None,
            mask_generator=generator,
            head_inputs=head_inputs,
            **kwargs,
        )

    def training_step(self, model: Callable[..., Any], batch: Any) -> StepOutput:
        out, aux = self._call(model, batch, None, aux=True)
        total = out.loss + aux if isinstance(aux, torch.Tensor) else out.loss
        return StepOutput(total, {"loss": out.loss.detach()}, int(out.pred.shape[0]))

    def new_metrics(self, device: torch.device) -> ReconstructionMetrics:
        return ReconstructionMetrics(self, device)

    def evaluate_step(self, model: Callable[..., Any], batch: Any, metrics: Metrics) -> None:
        metrics.update(self._call(model, batch, metrics.generator, aux=False), batch)

    def to_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images ``[B, C, H, W]`` (or frames ``[B, T, C, H, W]``) -> [0, 1] pixels (the loader's
        normalisation undone)."""
        return to_pixels(images, self.mean, self.std)

    def pixel_views(
        self, output: ReconstructionOutput, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(reconstruction, mean-colour fill, hidden-pixel mask [B, 1, H, W])`` in [0, 1] pixels, visible patches
        pasted back in both."""
        dec = self.detokenizer
        if dec is None:
            raise ValueError("task reconstruction has no head yet: build the encoder with this task")
        hidden = output.hidden if output.hidden is not None else torch.ones(output.pred.shape[:2], device=images.device)
        grid = (images.shape[2] // dec.patch_size, images.shape[3] // dec.patch_size)
        recon = self.to_pixels(dec.render(output.pred.float(), grid, images=images.float(), hidden=hidden))
        p = dec.patch_size
        hidden_px = unpatchify(hidden[..., None].float().expand(-1, -1, p * p), p, grid)  # [B, 1, H, W]
        true = self.to_pixels(images)
        visible = 1 - hidden_px
        # the mean colour of the visible pixels (of every pixel when nothing is visible: a VQ autoencoder, where the
        # baseline keeps one number per image and channel)
        seen = visible if bool(visible.any()) else torch.ones_like(visible)
        colour = (true * seen).flatten(2).sum(2) / seen.flatten(2).sum(2).clamp_min(1.0)  # [B, C]
        fill = true * visible + colour[:, :, None, None] * hidden_px
        return recon, fill, hidden_px

    def chance(self) -> dict[str, float] | None:
        # with per-patch normalised targets, predicting each patch's own mean (zeros) scores 1.0
        if self.target_kind == "pixels" and getattr(self.detokenizer, "norm_pix_loss", False):
            return {"loss": 1.0}
        return None

    def extra_repr(self) -> str:
        return f"mask_ratio={self.mask_ratio}"
