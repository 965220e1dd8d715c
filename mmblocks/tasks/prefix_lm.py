"""Prefix-LM tasks: the encoder's tokens, through an adapter, spliced into a causal LM that is trained to write the
sample's text (LLaVA, SLAM-LLM, Video-LLaMA), evaluated on what it generates.

The head (``model.head.name: prefix_lm``) is built here, above the LM loader and the heads: `prefix_lm_head` loads the
LM (`mmblocks.llm.load_lm`, frozen / norm / LoRA / full), builds the adapter from the encoder width to the LM width and
wraps both in a `PrefixLMHead`. The task owns the text side: the LM's tokenizer, the `PromptFormat` (saved in every
checkpoint and checked at generation, since a train / inference prompt mismatch is the classic cause of repetition
loops), what the answer is (the ``txt`` field, or one of the ``json`` question-answer pairs) and the metrics of the
generated text.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch

from adapters import create_adapter
from tokenizers_mm import Tokens

from ..data.moving_digits import DIRECTIONS, HELD_OUT_MOTIONS, parse_caption
from ..eval import bleu, cer, cider, exact_match, normalize_text, wer
from ..heads import PLACEHOLDER_ID, PrefixLMHead, PromptFormat, register_head
from ..llm import LM_TUNE_MODES, load_lm, load_tokenizer, set_lm_checkpointing
from .base import Metrics, StepOutput, Task, all_gather_rows, all_reduce_sum_
from .registry import register_task

__all__ = ["PREFIX_LM_METRICS", "PrefixLMMetrics", "PrefixLMTask", "motion_scores", "prefix_lm_head", "take_tokens"]

#: Metrics of the generated text a config may ask for, and the numbers each one reports (``exact_match`` also per
#: question type: ``exact_match_count``, ...).
PREFIX_LM_METRICS: dict[str, tuple[str, ...]] = {
    "exact_match": ("exact_match",),
    "wer": ("wer",),
    "cer": ("cer",),
    "bleu": ("bleu1", "bleu4"),
    "cider": ("cider",),
    "motion": tuple(f"{k}_acc{s}" for s in ("", "_held_out") for k in ("digit", "direction", "motion")),
}
_LOWER_IS_BETTER = ("loss", "wer", "cer")


@register_head("prefix_lm")
def prefix_lm_head(
    in_dim: int,
    lm: str = "smollm2-135m",
    tune: Literal["frozen", "norm", "lora", "full"] = "frozen",
    tune_kwargs: Mapping[str, Any] | None = None,
    dtype: str | None = None,
    attn_implementation: str | None = None,
    config_overrides: Mapping[str, Any] | None = None,
    seed: int = 0,
    adapter: str = "mlp",
    adapter_kwargs: Mapping[str, Any] | None = None,
    markers: bool = True,
    placeholder_id: int | None = None,
    max_length: int | None = None,
    grad_checkpointing: bool = False,
) -> PrefixLMHead:
    """A `PrefixLMHead` on encoder tokens of width `in_dim`: the causal LM `lm` (`mmblocks.llm.load_lm` with `tune`,
    `tune_kwargs` (LoRA ``r``, ``alpha``, ``dropout``, ``target``), `dtype`, `attn_implementation`,
    `config_overrides` and `seed` for ``random:`` sources) behind the adapter `adapter` (`adapters.create_adapter`,
    ``in_dim -> LM width``, with `adapter_kwargs`). `grad_checkpointing` recomputes the LM's layers in backward, also
    for a frozen LM in eval mode."""
    if tune not in LM_TUNE_MODES:
        raise ValueError(f"tune must be one of {LM_TUNE_MODES}, got {tune!r}")
    model = load_lm(
        lm,
        tune=tune,
        dtype=dtype,
        attn_implementation=attn_implementation,
        config_overrides=dict(config_overrides) if config_overrides else None,
        seed=seed,
        **dict(tune_kwargs or {}),
    )
    width = model.get_input_embeddings().embedding_dim
    proj = create_adapter(adapter, in_dim, width, **dict(adapter_kwargs or {}))
    head = PrefixLMHead(model, proj, placeholder_id=placeholder_id, markers=markers, max_length=max_length)
    if grad_checkpointing:
        set_lm_checkpointing(model)
    return head


def take_tokens(tokens: Tokens, index: torch.Tensor) -> Tokens:
    """The samples `index` of a batch of `Tokens` (repeats allowed: one copy per question asked of a sample)."""
    pick = lambda t: None if t is None else t.index_select(0, index)  # noqa: E731
    return replace(tokens, x=tokens.x.index_select(0, index), mask=pick(tokens.mask), pos=pick(tokens.pos))


class PrefixLMMetrics(Metrics):
    """The generated answers of a split next to their references (gathered across ranks at `sync`) and the summed
    teacher-forced loss. `compute` gives ``loss``, ``samples`` (answers scored) and the asked metrics: ``exact_match``
    (overall, ``exact_match_{type}`` per question type, and ``..._held_out`` on the questions about a held-out
    combination when the rows say so), corpus ``wer`` / ``cer``, ``bleu4`` (and BLEU-1) and
    ``cider`` (on normalised, whitespace-tokenised text), ``motion`` (``digit_acc``, ``direction_acc``, ``motion_acc``
    parsed from moving-digit captions, and the same on the held-out (digit, direction) pairs). `report` writes
    ``predictions_{split}.jsonl`` and a table of sample predictions next to their references."""

    def __init__(self, metrics: Sequence[str], device: torch.device, examples: int = 8, with_loss: bool = True):
        self.metrics, self.examples, self.with_loss = tuple(metrics), examples, with_loss
        self.rows: list[dict[str, Any]] = []
        self.totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, answers

    def add(self, loss: torch.Tensor, rows: list[dict[str, Any]]) -> None:
        self.totals[0] += loss.detach().double() * len(rows)
        self.totals[1] += len(rows)
        self.rows += rows

    def update(self, output: Any, batch: Any) -> None:
        raise TypeError("PrefixLMMetrics is filled by PrefixLMTask.evaluate_step (generation needs the model)")

    def sync(self) -> None:
        self.rows = all_gather_rows(self.rows)
        all_reduce_sum_([self.totals])

    def compute(self) -> dict[str, float]:
        loss, n = self.totals.tolist()
        out: dict[str, float] = {"loss": loss / n if n and self.with_loss else float("nan"), "samples": int(n)}
        if not self.rows:
            return out
        refs = [normalize_text(r["reference"]) for r in self.rows]
        hyps = [normalize_text(r["prediction"]) for r in self.rows]
        if "exact_match" in self.metrics:
            out["exact_match"] = exact_match(refs, hyps)
            by_type: dict[str, list[int]] = defaultdict(list)
            for i, r in enumerate(self.rows):
                if r.get("type"):
                    by_type[r["type"]].append(i)
            held = [i for i, r in enumerate(self.rows) if r.get("held_out")]
            if held:  # questions about a combination never seen in training
                out["exact_match_held_out"] = exact_match([refs[i] for i in held], [hyps[i] for i in held])
            for kind, idx in sorted(by_type.items()):
                out[f"exact_match_{kind}"] = exact_match([refs[i] for i in idx], [hyps[i] for i in idx])
                idx = [i for i in idx if self.rows[i].get("held_out")]
                if idx:
                    out[f"exact_match_{kind}_held_out"] = exact_match([refs[i] for i in idx], [hyps[i] for i in idx])
        if "wer" in self.metrics:
            out["wer"] = wer(refs, hyps)
        if "cer" in self.metrics:
            out["cer"] = cer(refs, hyps)
        if "bleu" in self.metrics:
            scores = bleu([[r] for r in refs], hyps)
            out["bleu1"], out["bleu4"] = scores[0], scores[3]
        if "cider" in self.metrics:
            out["cider"] = cider([[r] for r in refs], hyps)
        if "motion" in self.metrics:
            out.update(motion_scores(self.rows))
        return out

    def report(self, out_dir: Path, split: str) -> list[tuple[str, str]]:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"predictions_{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        cell = lambda t: str(t).replace("|", "\\|").replace("\n", " ")  # noqa: E731
        lines = ["| key | prompt | reference | prediction |", "|---|---|---|---|"]
        lines += [
            f"| {r['key']} | {cell(r['prompt'])} | {cell(r['reference'])} | {cell(r['prediction'])} |"
            for r in self.rows[: self.examples]
        ]
        return [(f"Generations ({split})", f"All in [{path.name}]({path.name}).\n\n" + "\n".join(lines) + "\n")]


def motion_scores(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Digit / direction / both accuracy of captions parsed with `parse_caption`, overall and on the held-out
    (digit, direction) pairs (rows need ``digit`` and ``direction`` from the sample's json)."""
    scored = [r for r in rows if r.get("digit") is not None and r.get("direction") is not None]
    out: dict[str, float] = {}
    for suffix, part in (("", scored), ("_held_out", [r for r in scored if r.get("held_out")])):
        if not part:
            continue
        parsed = [parse_caption(r["prediction"]) for r in part]
        digit = [p[0] == r["digit"] for p, r in zip(parsed, part)]
        direction = [p[1] == r["direction"] for p, r in zip(parsed, part)]
        out[f"digit_acc{suffix}"] = sum(digit) / len(part)
        out[f"direction_acc{suffix}"] = sum(direction) / len(part)
        out[f"motion_acc{suffix}"] = sum(a and b for a, b in zip(digit, direction)) / len(part)
    return out


@register_task("prefix_lm")
class PrefixLMTask(Task):
    """Learn to write each sample's text with a prefix-LM head, and score what it generates.

    Args:
        target: ``txt`` (the transcript / caption in the sample's ``txt``, answered to `prompt`) or ``qa`` (the
            question-answer pairs in the sample's ``json["qa"]``: one drawn per sample and step in training, every
            pair at evaluation; `prompt` holds ``{question}``).
        prompt: the instruction; with `placeholder` it must hold the placeholder once (LLaVA's ``<image>``), where
            the modality tokens go; without, they go before the text.
        placeholder: the placeholder text in `prompt` (never tokenized), or None.
        system: a system message for the chat template.
        chat_template: use the tokenizer's chat template when it has one.
        tokenizer: where the tokenizer comes from (default: the head's ``lm``; a ``random:`` LM needs one).
        metrics: any of `PREFIX_LM_METRICS`; monitor: the validation metric that picks the best step (``loss`` or one
            of those computed; WER / CER / loss are minimised, the rest maximised).
        max_new_tokens: the generation budget at evaluation (greedy decoding).
        eval_loss: also compute the teacher-forced loss at evaluation (one more forward).
        examples: sample predictions in the report.
    """

    fields = ("txt",)
    default_head = "prefix_lm"
    monitor = ("loss", "min")

    def __init__(
        self,
        target: Literal["txt", "qa"] = "txt",
        prompt: str = "<input>\nDescribe this.",
        placeholder: str | None = "<input>",
        system: str | None = None,
        chat_template: bool = True,
        tokenizer: str | None = None,
        metrics: Sequence[str] = ("exact_match",),
        monitor: str = "loss",
        max_new_tokens: int = 32,
        eval_loss: bool = True,
        examples: int = 8,
    ):
        if target not in ("txt", "qa"):
            raise ValueError(f"target must be 'txt' or 'qa', got {target!r}")
        unknown = sorted(set(metrics) - set(PREFIX_LM_METRICS))
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; choose from {list(PREFIX_LM_METRICS)}")
        if target == "qa" and "{question}" not in prompt:
            raise ValueError(f"a qa prompt must hold '{{question}}' where each question goes, got {prompt!r}")
        if target == "qa" and "motion" in metrics:
            raise ValueError("the motion metric reads captions (target 'txt'), not question answers")
        reported = {"loss"} if eval_loss else set()
        reported |= {k for m in metrics for k in PREFIX_LM_METRICS[m]}
        per_type = monitor.startswith("exact_match_") and "exact_match" in metrics
        if monitor not in reported and not per_type:
            why = " (eval_loss is off)" if monitor == "loss" else ""
            raise ValueError(f"monitor {monitor!r} is not reported{why}; the metrics give {sorted(reported)}")
        self.target = target
        self.fields = ("json",) if target == "qa" else ("txt",) + (("json",) if "motion" in metrics else ())
        self.prompt = prompt
        self.format = PromptFormat(system=system, chat_template=chat_template, placeholder=placeholder)
        if placeholder is not None and prompt.count(placeholder) != 1:
            raise ValueError(f"the prompt must hold the placeholder {placeholder!r} exactly once: {prompt!r}")
        self.tokenizer_source = tokenizer
        self.tokenizer: Any = None
        self.metrics = tuple(metrics)
        self.monitor = (monitor, "min" if monitor in _LOWER_IS_BETTER else "max")
        self.max_new_tokens = int(max_new_tokens)
        self.eval_loss = bool(eval_loss)
        self.examples = int(examples)

    # ------------------------------------------------------------------ head and text side
    def build_head(self, in_dim: int, name: str | None = None, **kwargs: Any) -> PrefixLMHead:
        if self.format.placeholder is not None:
            if kwargs.get("placeholder_id") not in (None, PLACEHOLDER_ID):
                raise ValueError(
                    f"model.head.placeholder_id={kwargs['placeholder_id']} but the task's prompt placeholder is "
                    f"tokenized as {PLACEHOLDER_ID}: leave placeholder_id null"
                )
            kwargs["placeholder_id"] = PLACEHOLDER_ID
        head = super().build_head(in_dim, name, **kwargs)
        source = self.tokenizer_source or kwargs.get("lm", "smollm2-135m")
        self.set_tokenizer(load_tokenizer(source), head)
        return head

    def set_tokenizer(self, tokenizer: Any, head: PrefixLMHead | None = None) -> None:
        """Use `tokenizer` for the text (checked against the head's LM vocabulary when given)."""
        if head is not None:
            vocab = head.lm.get_input_embeddings().num_embeddings
            if len(tokenizer) > vocab:
                raise ValueError(
                    f"the tokenizer has {len(tokenizer)} tokens but the LM embeds {vocab}: give a tokenizer of this LM "
                    "(task.tokenizer) or an LM with its vocabulary (config_overrides vocab_size)"
                )
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token is None:
                raise ValueError("the tokenizer has neither a pad nor an end-of-sequence token: set one of them")
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer

    def checkpoint_state(self) -> dict[str, Any]:
        """What generation must reproduce: the prompt and its format (saved in every checkpoint)."""
        return {"prompt": self.prompt, "prompt_format": self.format.to_dict(), "target": self.target}

    def check_checkpoint_state(self, state: Mapping[str, Any]) -> None:
        """Refuse to generate with another prompt format than the checkpoint was trained with."""
        mine = self.checkpoint_state()
        diff = [k for k in ("prompt", "prompt_format") if k in state and state[k] != mine[k]]
        if diff:
            said = "; ".join(f"{k}: checkpoint {state[k]!r}, config {mine[k]!r}" for k in diff)
            raise ValueError(
                f"the config's prompt differs from the one the checkpoint was trained with ({said}); a train / "
                "inference prompt mismatch makes the LM ramble: use the training config"
            )

    def examples_of(self, batch: Any, train: bool) -> tuple[list[int], list[str], list[str], list[dict[str, Any]]]:
        """``(sample index, prompt, answer, row info)`` per sequence: one per sample for ``txt``; for ``qa`` one pair
        drawn per sample in training (the global torch RNG, saved with checkpoints), every pair at evaluation."""
        if self.tokenizer is None:
            raise RuntimeError("PrefixLMTask has no tokenizer yet: build the head (build_head) or call set_tokenizer")
        index, prompts, answers, info = [], [], [], []
        if self.target == "txt":
            metas = batch.fields.get("json") or [None] * len(batch.key)
            for i, (text, meta) in enumerate(zip(batch.field("txt"), metas)):
                index.append(i)
                prompts.append(self.prompt)
                answers.append(text)
                info.append(_motion_info(meta))
            return index, prompts, answers, info
        for i, (key, meta) in enumerate(zip(batch.key, batch.field("json"))):
            pairs = meta.get("qa") if isinstance(meta, dict) else None
            if not pairs:
                raise ValueError(f"sample {key} has no json['qa'] question-answer pairs (task target 'qa')")
            chosen = [pairs[int(torch.randint(len(pairs), ()))]] if train else pairs
            for qa in chosen:
                index.append(i)
                prompts.append(self.prompt.format(question=qa["question"]))
                answers.append(qa["answer"])
                info.append({"type": qa.get("type"), **({"held_out": qa["held_out"]} if "held_out" in qa else {})})
        return index, prompts, answers, info

    def _text(self, prompts: list[str], answers: list[str] | None, device: torch.device) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in self.format.batch(self.tokenizer, prompts, answers).items()}

    # ------------------------------------------------------------------ training
    def training_step(self, model: Callable[..., Any], batch: Any) -> StepOutput:
        index, prompts, answers, _ = self.examples_of(batch, train=True)
        if index != list(range(len(batch.key))):
            raise AssertionError("one sequence per sample in training")
        text = self._text(prompts, answers, batch.inputs.device)
        args, kwargs = self.model_inputs(batch)
        out, aux = model(*args, return_aux=True, head_inputs=text, **kwargs)
        total = out.loss + aux if isinstance(aux, torch.Tensor) else out.loss
        return StepOutput(total, {"loss": out.loss.detach()}, len(index))

    # ------------------------------------------------------------------ evaluation
    def new_metrics(self, device: torch.device) -> PrefixLMMetrics:
        return PrefixLMMetrics(self.metrics, device, self.examples, with_loss=self.eval_loss)

    def generate(self, model: Any, tokens: Tokens, prompts: list[str], **generate_kwargs: Any) -> list[str]:
        """Greedy answers of `model.head` (a `PrefixLMHead`) to `prompts` about the encoded `tokens` (one each)."""
        text = self._text(prompts, None, tokens.x.device)
        options = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": False,
            "pad_token_id": self.tokenizer.pad_token_id,
            **generate_kwargs,
        }
        stop = self.stop_ids(prompts[0])
        if stop:  # else the LM's generation config decides
            options.setdefault("eos_token_id", stop)
        ids = model.head.generate(tokens, text["input_ids"], text["attention_mask"], **options)
        return [s.strip() for s in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def stop_ids(self, prompt: str) -> list[int]:
        """The ids that end an answer: the tokenizer's end-of-sequence and the special tokens the format puts after
        an answer (a chat template's end of turn, e.g. ``<|im_end|>``), whatever the LM's generation config says."""
        _, labels = self.format.encode(self.tokenizer, prompt, "x")
        special = set(self.tokenizer.all_special_ids)
        ids = {i for i in labels if i in special}
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return sorted(ids)

    def evaluate_step(self, model: Callable[..., Any], batch: Any, metrics: Metrics) -> None:
        if not isinstance(metrics, PrefixLMMetrics):
            raise TypeError(f"PrefixLMTask evaluates into PrefixLMMetrics, got {type(metrics).__name__}")
        args, kwargs = self.model_inputs(batch)
        tokens = model.forward_features(*args, **kwargs)
        index, prompts, answers, info = self.examples_of(batch, train=False)
        tokens = take_tokens(tokens, torch.tensor(index, device=tokens.x.device))
        loss = torch.zeros((), device=tokens.x.device)
        if self.eval_loss:
            loss = model.head(tokens, **self._text(prompts, answers, tokens.x.device)).loss
        predictions = self.generate(model, tokens, prompts)
        rows = [
            {"key": batch.key[i], "prompt": p, "reference": a, "prediction": h, **extra}
            for i, p, a, h, extra in zip(index, prompts, answers, predictions, info)
        ]
        metrics.add(loss, rows)

    def extra_repr(self) -> str:
        return f"target={self.target!r}, prompt={self.prompt!r}, metrics={list(self.metrics)}"


def _motion_info(meta: Any) -> dict[str, Any]:
    """``digit``, ``direction`` and ``held_out`` of a moving-digit sample's json (empty for other samples)."""
    if not isinstance(meta, dict) or "digit" not in meta or "direction" not in meta:
        return {}
    digit, direction = int(meta["digit"]), meta["direction"]
    direction = DIRECTIONS.index(direction) if isinstance(direction, str) else int(direction)
    return {"digit": digit, "direction": direction, "held_out": (digit, direction) in HELD_OUT_MOTIONS}
