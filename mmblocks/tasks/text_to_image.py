"""Text -> image generation through an LM: ``"draw the digit seven"`` -> VQ codes -> the VQ tokenizer's decoder.

The model is an `MMEncoder` whose tokenizer and backbone are a trained VQ image tokenizer's encoder (loaded with
``model.init`` and frozen) and whose head is a `CodeLMHead` (``code_lm``): a causal LM with its vocabulary extended by
the codebook (LLM-CXR / Video-LaVIT). Training is teacher-forced cross-entropy on each image's codes after its class
prompt; the encoder only turns training images into codes.

Evaluation (every evaluation, on every class of the task): ``samples`` images per prompt are sampled and rendered,
then judged by a classifier trained on the *real* training digits (scikit-learn's logistic regression on 8x8 pixels,
the dataset's own split), so the figures say whether a generated image looks like the asked digit to a model that has
only seen real ones:
- ``generated_acc``: the share of generated images the judge reads as the prompt's class (chance: 1 / classes);
  ``generated_acc_{class}`` per prompt;
- ``distinct``: distinct code sequences per prompt / samples (1 = no two samples alike; mode collapse -> 1 / samples);
- ``judge_acc_real`` (the judge on the split's real images) and ``judge_acc_recon`` (on their VQ reconstructions: what
  a perfect LM could reach through this tokenizer);
- ``loss``: the teacher-forced code cross-entropy (``ln K`` is a uniform guess).
The report shows a grid of generated images, a row per prompt.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from tokenizers_mm.image import unpatchify
from tokenizers_mm.vq import Distance

from ..heads import CodeLMHead, register_head
from ..llm import LM_TUNE_MODES, load_lm, load_tokenizer
from .base import Metrics, StepOutput, Task, all_reduce_sum_
from .reconstruction import save_panels, to_pixels
from .registry import register_task

__all__ = ["DIGIT_WORDS", "TextToImageMetrics", "TextToImageTask", "code_lm_head", "digits_judge"]

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@register_head("code_lm")
def code_lm_head(
    in_dim: int,
    lm: str = "smollm2-135m",
    tune: Literal["frozen", "norm", "lora", "full"] = "lora",
    tune_kwargs: Mapping[str, Any] | None = None,
    config_overrides: Mapping[str, Any] | None = None,
    seed: int = 0,
    detokenizer: Literal["pixels", "motion"] = "pixels",
    decoder_dim: int = 128,
    depth: int = 2,
    num_heads: int = 4,
    mlp_ratio: float = 4.0,
    norm_pix_loss: bool = False,
    codebook_size: int = 128,
    code_dim: int = 16,
    vq_distance: Distance = "euclidean",
    tokenizer: nn.Module | None = None,
) -> CodeLMHead:
    """A `CodeLMHead`: the causal LM `lm` (`mmblocks.llm.load_lm` with `tune`, `tune_kwargs` (LoRA ``r``, ``alpha``,
    ``dropout``, ``target``), `config_overrides` and `seed` for ``random:`` sources) over the codes of a VQ tokenizer
    built with the remaining options (those it was trained with; ``model.init`` loads it)."""
    if tune not in LM_TUNE_MODES:
        raise ValueError(f"tune must be one of {LM_TUNE_MODES}, got {tune!r}")
    model = load_lm(
        lm,
        tune=tune,
        config_overrides=dict(config_overrides) if config_overrides else None,
        seed=seed,
        **dict(tune_kwargs or {}),
    )
    return CodeLMHead(
        in_dim,
        model,
        detokenizer,
        decoder_dim,
        depth,
        num_heads,
        mlp_ratio,
        norm_pix_loss,
        codebook_size,
        code_dim,
        vq_distance,
        tokenizer=tokenizer,
    )


def digits_judge(seed: int = 0) -> tuple[Any, float]:
    """A logistic regression on scikit-learn's real 8x8 digits (values / 16, in [0, 1]) of the ``digits`` dataset's
    train split (`mmblocks.data.datasets.digits_splits` with `seed`), and its accuracy on the test split."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    from ..data.datasets import digits_splits

    digits = load_digits()
    x, y = digits.images.reshape(len(digits.images), -1) / 16.0, digits.target
    splits = digits_splits(seed)
    judge = LogisticRegression(max_iter=5000, C=1.0).fit(x[splits["train"]], y[splits["train"]])
    return judge, float(judge.score(x[splits["test"]], y[splits["test"]]))


class TextToImageMetrics(Metrics):
    """Teacher-forced loss and the judge's accuracy on real images and their reconstructions, summed per batch; the
    generated samples of every prompt (drawn once, at the first batch of the evaluation; every rank draws the same ones
    from the same seed)."""

    def __init__(self, task: TextToImageTask, device: torch.device):
        self.task = task
        self.totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, real hits, recon hits, n
        self.generated: dict[int, np.ndarray] | None = None  # class -> [samples, H, W] images in [0, 1]
        self.codes: dict[int, torch.Tensor] = {}

    def update(self, output: Any, batch: Any) -> None:
        loss, real_pred, recon_pred, labels = output
        n = len(labels)
        self.totals[0] += float(loss) * n
        self.totals[1] += float((real_pred == labels).sum())
        self.totals[2] += float((recon_pred == labels).sum())
        self.totals[3] += n

    def sync(self) -> None:
        all_reduce_sum_([self.totals])

    def compute(self) -> dict[str, float]:
        loss, real, recon, n = self.totals.tolist()
        out: dict[str, float] = {"samples": int(n)}
        if n:
            out.update(loss=loss / n, judge_acc_real=real / n, judge_acc_recon=recon / n)
        if self.generated:
            hits, total = 0, 0
            for cls, images in self.generated.items():
                pred = self.task.judge.predict(images.reshape(len(images), -1))
                acc = float((pred == cls).mean())
                out[f"generated_acc_{self.task.words[cls]}"] = acc
                hits, total = hits + int((pred == cls).sum()), total + len(pred)
                codes = self.codes[cls]
                out[f"distinct_{self.task.words[cls]}"] = len({tuple(c.tolist()) for c in codes}) / len(codes)
            out["generated_acc"] = hits / max(total, 1)
            out["distinct"] = float(np.mean([out[f"distinct_{self.task.words[c]}"] for c in self.generated]))
            out["chance"] = 1.0 / len(self.task.words)
        return out

    def report(self, out_dir: Path, split: str) -> list[tuple[str, str]]:
        if not self.generated:
            return []
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"generated_{split}.png"
        cols = min(10, self.task.samples)
        save_panels([torch.tensor(im[:cols]).unsqueeze(1).float() for im in self.generated.values()], path)
        rows = ["| prompt | judged as asked | distinct codes |", "|---|---|---|"]
        stats = self.compute()
        for cls in self.generated:
            word = self.task.words[cls]
            prompt = self.task.prompt.format(name=word)
            rows.append(f"| {prompt} | {stats[f'generated_acc_{word}']:.2f} | {stats[f'distinct_{word}']:.2f} |")
        text = (
            f"![generated]({path.name})\n\nA row per prompt, {cols} of its {self.task.samples} samples "
            f"(temperature {self.task.temperature}). Chance {1 / len(self.task.words):.2f}.\n\n"
            + "\n".join(rows)
            + "\n"
        )
        return [(f"Generated images ({split})", text)]


@register_task("text_to_image")
class TextToImageTask(Task):
    """Generate an image of each class from a text prompt (the ``code_lm`` head over a frozen VQ image tokenizer).

    Args:
        num_classes / class_names: the dataset's classes (from the shards).
        words: the word of each class in the prompt (default: ``zero`` .. ``nine`` for the ten digit classes, the
            class names otherwise).
        prompt: the prompt, ``{name}`` standing for the class word.
        samples / temperature / top_k: sampling at evaluation (``samples`` images per prompt).
        split_seed: the ``digits`` dataset's split seed (the judge trains on that split's real training digits).
        seed: the sampling generator's seed (the same samples at every evaluation of the same weights).
        text_tokenizer: where the prompts' tokenizer comes from (default: the head's ``lm``).
    """

    fields = ("cls",)
    default_head = "code_lm"
    monitor = ("generated_acc", "max")
    head_needs_tokenizer = True

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str] = (),
        words: Sequence[str] | None = None,
        prompt: str = "draw the digit {name}",
        samples: int = 16,
        temperature: float = 1.0,
        top_k: int | None = None,
        split_seed: int = 0,
        seed: int = 0,
        text_tokenizer: str | None = None,
    ):
        if "{name}" not in prompt:
            raise ValueError(f"prompt must hold {{name}} where the class word goes, got {prompt!r}")
        names = list(class_names) or [str(i) for i in range(num_classes)]
        if words is None:
            words = DIGIT_WORDS if names == [str(i) for i in range(10)] else names
        if len(words) != num_classes:
            raise ValueError(f"words must give one word per class ({num_classes}), got {len(words)}")
        self.words, self.prompt = list(words), prompt
        self.samples, self.temperature, self.top_k = int(samples), float(temperature), top_k
        self.seed, self.text_tokenizer = int(seed), text_tokenizer
        self.judge, self.judge_test_acc = digits_judge(split_seed)
        self.tokenizer: Any = None
        self.head: CodeLMHead | None = None

    def build_head(self, in_dim: int, name: str | None = None, tokenizer: nn.Module | None = None, **kwargs: Any):
        head = super().build_head(in_dim, name, tokenizer=tokenizer, **kwargs)
        self.tokenizer = load_tokenizer(self.text_tokenizer or kwargs.get("lm", "smollm2-135m"))
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.head = head
        return head

    def prompts(self, labels: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        texts = [self.prompt.format(name=self.words[int(c)]) for c in labels]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True)
        return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}

    def training_step(self, model: Callable[..., Any], batch: Any) -> StepOutput:
        labels = batch.field("cls")
        out, aux = model(batch.inputs, return_aux=True, head_inputs=self.prompts(labels, batch.inputs.device))
        total = out.loss + aux if isinstance(aux, torch.Tensor) else out.loss
        return StepOutput(total, {"loss": out.loss.detach()}, len(labels))

    def new_metrics(self, device: torch.device) -> TextToImageMetrics:
        return TextToImageMetrics(self, device)

    def to_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Loader-normalised images ``[B, C, H, W]`` -> [0, 1] (the loader's default normalisation undone)."""
        return to_pixels(images)

    def render(self, codes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Codes ``[B, N]`` -> images ``[B, C, H, W]`` in [0, 1]."""
        head = self.head
        pred = head.decode_codes(codes, grid)
        return self.to_pixels(unpatchify(pred, head.detokenizer.patch_size, grid))

    def judge_images(self, images: torch.Tensor) -> np.ndarray:
        """The judge's class of each ``[B, 1, 8, 8]`` image in [0, 1]."""
        if images.shape[1:] != (1, 8, 8):
            raise ValueError(f"the digits judge reads [B, 1, 8, 8] images, got {tuple(images.shape)}")
        return self.judge.predict(images.reshape(len(images), -1).cpu().numpy())

    def evaluate_step(self, model: Callable[..., Any], batch: Any, metrics: Metrics) -> None:
        labels = batch.field("cls")
        device = batch.inputs.device
        encoder = getattr(model, "module", model)
        out = model(batch.inputs, head_inputs=self.prompts(labels, device))
        grid = encoder.tokenizer.grid_size
        real = self.judge_images(self.to_pixels(batch.inputs))
        recon = self.judge_images(self.render(out.codes, grid))
        metrics.update((out.loss, real, recon, labels.cpu().numpy()), batch)
        if metrics.generated is None:
            metrics.generated = {}
            gen = torch.Generator().manual_seed(self.seed)
            n = math.prod(grid)
            for cls in range(len(self.words)):
                prompts = self.prompts(torch.full((self.samples,), cls), device)
                codes = self.head.generate(
                    prompts["input_ids"], prompts["attention_mask"], n, self.temperature, self.top_k, gen
                )
                metrics.codes[cls] = codes.cpu()
                metrics.generated[cls] = self.render(codes, grid)[:, 0].cpu().numpy()

    def chance(self) -> dict[str, float] | None:
        head = self.head
        k = head.codebook_size if head is not None else None
        return {"generated_acc": 1.0 / len(self.words), **({"loss": math.log(k)} if k else {})}

    def extra_repr(self) -> str:
        return f"prompt={self.prompt!r}, samples={self.samples}"
