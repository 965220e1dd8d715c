"""Contrastive training (CLIP, SigLIP, LiT): an encoder's pooled tokens against a text tower's, with open_clip's own
losses, and zero-shot evaluation of what it learned.

The head is a `mmblocks.heads.ContrastiveHead` (``model.head.name: contrastive``), built around the text tower of
``model.text_tower`` (`mmblocks.models.text_towers`, built by the config layer and handed to `build_head`). The task
owns the text side of each sample: its caption (the ``txt`` field) or a prompt made from its class name (``text:
class``, a template drawn per sample and step in training). The loss is ``open_clip.loss.ClipLoss`` or
``SigLipLoss``, imported, configured for the process group: under DDP each rank scores its own images against the
texts of every rank (``local_loss`` + ``gather_with_grad``; SigLIP's neighbour exchange), which gives the gradients
of the global loss on the concatenated batch.

With a locked text tower (LiT) the tower's output of each distinct text is computed once and cached; only the
projection after it (if any) trains.

Evaluation embeds the split and scores it as zero-shot classification among its texts: the distinct captions of the
split (``text: txt``), or every class name through the prompt ensemble of `templates` (``text: class``), as
CLIP_benchmark does: ``acc1``, ``acc5``, ``mean_per_class_recall``, the same on the held-out items (``acc1_held_out``,
a held-out class or a caption flagged ``held_out`` in the sample's json: never trained on; among every text, the
generalised zero-shot figure) and on the rest (``acc1_seen``), the held-out items among the held-out texts only
(``acc1_held_out_restricted``, zero-shot proper), plus retrieval both ways with several items per text
(``image_retrieval_recall@k``: a text finds one of its items in its top k; ``text_retrieval_recall@k``: an item finds
its text) and the loss (the mean over evaluation batches).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..data.moving_digits import parse_caption
from ..eval import classification_metrics, fill_template, grouped_retrieval_metrics
from ..heads import ContrastiveHead
from .base import Metrics, StepOutput, Task, all_gather_rows, all_reduce_sum_
from .prefix_lm import motion_scores
from .registry import register_task

__all__ = ["CONTRASTIVE_METRICS", "ContrastiveMetrics", "ContrastiveTask", "unwrap_model"]

_LOSSES = ("clip", "siglip")
#: Extra figures of the predicted texts: ``motion`` parses moving-digit captions (the digit and the direction of the
#: best-scoring caption against the clip's own: ``digit_acc``, ``direction_acc``, ``motion_acc``, each also
#: ``_held_out``).
CONTRASTIVE_METRICS = ("motion",)


def unwrap_model(model: Any) -> Any:
    """The module inside DDP / FSDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ContrastiveMetrics(Metrics):
    """The split's item embeddings with the text of each, the texts' embeddings, and the summed loss; scored as
    zero-shot classification and grouped retrieval at `compute` (see the module docstring)."""

    def __init__(
        self,
        device: torch.device,
        recall_k: Sequence[int] = (1, 5),
        class_names: Sequence[str] = (),
        metrics: Sequence[str] = (),
    ):
        self.recall_k = tuple(recall_k)
        self.class_names = list(class_names)
        self.metrics = tuple(metrics)
        self.rows: list[tuple[str, bool]] = []  # per item: its text, held out or not
        self.items: list[torch.Tensor] = []
        self.texts: dict[str, torch.Tensor] = {}  # text -> normalised embedding [E] (class: the prompt ensemble)
        self.totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, items

    def update(self, output: Any, batch: Any) -> None:
        raise TypeError("ContrastiveMetrics is filled by ContrastiveTask.evaluate_step (text encoding needs the model)")

    def add(self, loss: torch.Tensor, items: torch.Tensor, texts: list[str], held: list[bool]) -> None:
        self.totals[0] += loss.detach().double() * len(texts)
        self.totals[1] += len(texts)
        self.items.append(items.detach().float().cpu())
        self.rows += list(zip(texts, held))

    def sync(self) -> None:
        all_reduce_sum_([self.totals])
        rows = list(zip(self.rows, torch.cat(self.items).tolist())) if self.items else []
        gathered = all_gather_rows(rows)
        self.rows = [r for r, _ in gathered]
        self.items = [torch.tensor([f for _, f in gathered])] if gathered else []
        texts = all_gather_rows([(t, v.tolist()) for t, v in self.texts.items()])
        self.texts = {t: torch.tensor(v) for t, v in texts}

    def compute(self) -> dict[str, float]:
        loss, n = self.totals.tolist()
        out: dict[str, float] = {"loss": loss / n if n else float("nan"), "samples": int(n)}
        if not self.rows:
            return out
        names = self.class_names or sorted({t for t, _ in self.rows})
        missing = sorted({t for t, _ in self.rows} - set(self.texts))
        if missing:
            raise RuntimeError(f"no text embedding for {missing[:3]}: evaluate_step encodes every text it adds")
        weights = torch.stack([self.texts[t] for t in names])  # [K, E]
        items = torch.cat(self.items)
        position = {t: i for i, t in enumerate(names)}
        targets = torch.tensor([position[t] for t, _ in self.rows])
        logits = 100.0 * items @ weights.T
        out.update(classification_metrics(logits, targets))
        out["candidates"] = len(names)
        held = torch.tensor([h for _, h in self.rows])
        for suffix, part in (("_held_out", held), ("_seen", ~held)):
            if part.any() and not part.all():
                out[f"acc1{suffix}"] = (logits[part].argmax(1) == targets[part]).float().mean().item()
        if held.all():
            out["acc1_held_out"] = out["acc1"]
        if held.any() and not held.all():
            # zero-shot proper (ZSL): the held-out items among the held-out texts only; acc1_held_out is the
            # generalised figure (GZSL), among every text, where a model biased to the trained ones scores low
            columns = sorted({int(c) for c in targets[held].tolist()})
            sub = logits[held][:, columns].argmax(1)
            out["acc1_held_out_restricted"] = (torch.tensor(columns)[sub] == targets[held]).float().mean().item()
            out["held_out_candidates"] = len(columns)
        present = sorted(set(targets.tolist()))
        remap = {c: i for i, c in enumerate(present)}
        ks = [k for k in self.recall_k if k <= min(len(present), len(items))]
        out.update(
            grouped_retrieval_metrics(
                items, weights[present], torch.tensor([remap[c] for c in targets.tolist()]), recall_k=ks
            )
        )
        if "motion" in self.metrics:  # the predicted caption's digit and direction against the clip's own
            predicted = [names[i] for i in logits.argmax(1).tolist()]
            rows = []
            for (text, h), guess in zip(self.rows, predicted):
                digit, direction = parse_caption(text)
                if digit is not None and direction is not None:
                    rows.append({"prediction": guess, "digit": digit, "direction": direction, "held_out": h})
            out.update(motion_scores(rows))
        return out


@register_task("contrastive")
class ContrastiveTask(Task):
    """Align an encoder with a text tower (CLIP / SigLIP / LiT) and evaluate it zero-shot.

    Args:
        loss: ``clip`` (open_clip's ``ClipLoss``: symmetric cross-entropy) or ``siglip`` (``SigLipLoss``: pairwise
            sigmoid; give the head ``init_logit_bias: -10`` and ``init_logit_scale: 2.3``, SigLIP's start).
        text: ``txt`` (each sample's caption) or ``class`` (a prompt from its class name and `templates`).
        templates: prompt templates with ``{c}`` for ``text: class`` (one drawn per sample and step in training,
            their normalised mean at evaluation: open_clip's prompt ensemble).
        classnames: the classes' names in label order (``text: class``; default: ``class_names``, the shards'
            ``index.json`` names, which the config layer passes).
        held_out_classes: class names (``text: class``) whose samples are dropped from every training batch: the
            zero-shot classes, scored apart at evaluation (``acc1_held_out``).
        held_out_key: for ``text: txt``, a key of the sample's json that flags an item whose caption was never
            trained on (``moving-digit-captions``: ``held_out``); None: no such split.
        cache_text: cache the output of a locked text tower per distinct text (LiT); ignored for a tower that trains.
        recall_k: the k of the retrieval recalls at evaluation.
        metrics: extra figures of the best-scoring texts (`CONTRASTIVE_METRICS`): ``motion`` for moving-digit
            captions.
        monitor: the validation metric that picks the best step (default ``acc1``, maximised; ``loss`` minimised).
    """

    default_head = "contrastive"
    monitor = ("acc1", "max")

    def __init__(
        self,
        loss: Literal["clip", "siglip"] = "clip",
        text: Literal["txt", "class"] = "txt",
        templates: Sequence[str] = ("{c}",),
        classnames: Sequence[str] | None = None,
        class_names: Sequence[str] | None = None,
        held_out_classes: Sequence[str] = (),
        held_out_key: str | None = None,
        cache_text: bool = True,
        recall_k: Sequence[int] = (1, 5),
        metrics: Sequence[str] = (),
        monitor: str = "acc1",
    ):
        if loss not in _LOSSES:
            raise ValueError(f"loss must be one of {_LOSSES}, got {loss!r}")
        if text not in ("txt", "class"):
            raise ValueError(
                f"text must be 'txt' (the caption) or 'class' (a prompt from the class name), got {text!r}"
            )
        if isinstance(templates, str) or not templates:
            raise ValueError("templates must be a non-empty list of prompts with {c} for the class name")
        for t in templates:
            fill_template(t, "x")  # raises without a slot
        self.loss_name, self.text = loss, text
        self.templates = list(templates)
        self.class_names = list(classnames or class_names or [])
        if text == "class" and not self.class_names:
            raise ValueError(
                "text: class needs the class names (task.classnames, or shards whose index.json lists them)"
            )
        unknown = sorted(set(held_out_classes) - set(self.class_names))
        if unknown:
            raise ValueError(f"held_out_classes {unknown} are not class names ({self.class_names[:8]}...)")
        if held_out_classes and text != "class":
            raise ValueError("held_out_classes needs text: class (for captions, flag items with held_out_key)")
        self.held_out_classes = list(held_out_classes)
        self._held_ids = {self.class_names.index(c) for c in held_out_classes}
        self.held_out_key = held_out_key
        self.cache_text = bool(cache_text)
        self.recall_k = tuple(int(k) for k in recall_k)
        unknown = sorted(set(metrics) - set(CONTRASTIVE_METRICS))
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; choose from {list(CONTRASTIVE_METRICS)}")
        if "motion" in metrics and text != "txt":
            raise ValueError("the motion metric reads moving-digit captions (text: txt)")
        self.metrics = tuple(metrics)
        self.monitor = (monitor, "min" if monitor == "loss" else "max")
        self.fields = ("cls",) if text == "class" else ("txt",) + (("json",) if held_out_key else ())
        self._loss: Any = None
        self._loss_world: tuple[int, int] | None = None
        self.cache: dict[str, torch.Tensor] = {}  # text -> locked tower output [width] (CPU)
        self.dropped = 0  # training samples of held-out classes dropped so far

    # ------------------------------------------------------------------ head
    def build_head(self, in_dim: int, name: str | None = None, **kwargs: Any) -> ContrastiveHead:
        if kwargs.get("text_tower") is None:
            raise ValueError(
                "task contrastive needs a text tower: set model.text_tower: {name: minilm | open_clip | "
                "llm_blocks, ...}"
            )
        if self.loss_name == "siglip" and kwargs.get("init_logit_bias") is None:
            raise ValueError("loss siglip needs a logit bias: set model.head.init_logit_bias (SigLIP starts at -10)")
        return super().build_head(in_dim, name, **kwargs)

    def checkpoint_state(self) -> dict[str, Any]:
        return {"text": self.text, "templates": self.templates, "held_out_classes": self.held_out_classes}

    # ------------------------------------------------------------------ text side
    def texts_of(self, batch: Any, train: bool) -> tuple[list[int], list[str], list[bool]]:
        """``(sample index, text, held out)`` of the samples used: in training, samples of held-out classes are left
        out and a template is drawn per sample (the global torch RNG, saved with checkpoints)."""
        if self.text == "txt":
            texts = list(batch.field("txt"))
            if self.held_out_key:
                metas = batch.field("json")
                held = [bool(m.get(self.held_out_key, False)) if isinstance(m, dict) else False for m in metas]
            else:
                held = [False] * len(texts)
            return list(range(len(texts))), texts, held
        labels = batch.field("cls").tolist()
        index, texts, held = [], [], []
        for i, label in enumerate(labels):
            if not 0 <= label < len(self.class_names):
                raise ValueError(f"label {label} outside the {len(self.class_names)} class names")
            if train and label in self._held_ids:
                continue
            index.append(i)
            name = self.class_names[label]
            if train:  # one template drawn per sample; none drawn (the RNG untouched) when there is one
                pick = int(torch.randint(len(self.templates), ())) if len(self.templates) > 1 else 0
                texts.append(fill_template(self.templates[pick], name))
            else:
                texts.append(name)
            held.append(label in self._held_ids)
        return index, texts, held

    def text_inputs(self, head: ContrastiveHead, texts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """The head's text keyword: cached tower outputs (``text_embeds``) for a locked tower, else token ids."""
        if not (self.cache_text and head.text_locked):
            return {"text": head.tokenize(texts).to(device)}
        missing = sorted({t for t in texts if t not in self.cache})
        if missing:
            with torch.no_grad():
                for start in range(0, len(missing), 256):
                    chunk = missing[start : start + 256]
                    out = head.text_embeds(head.tokenize(chunk).to(device)).float().cpu()
                    self.cache.update(zip(chunk, out))
        return {"text_embeds": torch.stack([self.cache[t] for t in texts]).to(device)}

    def loss_fn(self) -> Callable[..., torch.Tensor]:
        """open_clip's loss for the current process group (rebuilt if the group changed)."""
        world = _world()
        if self._loss is None or self._loss_world != world:
            from open_clip.loss import ClipLoss, SigLipLoss

            rank, size = world
            if self.loss_name == "clip":
                self._loss = ClipLoss(
                    local_loss=True, gather_with_grad=True, cache_labels=True, rank=rank, world_size=size
                )
            else:
                self._loss = SigLipLoss(rank=rank, world_size=size)
            self._loss_world = world
        return self._loss

    def loss(self, out: dict[str, Any]) -> torch.Tensor:
        if "text_features" not in out:
            raise ValueError("the contrastive head returned no text_features: give it text")
        fn = self.loss_fn()
        if self.loss_name == "siglip":
            if out.get("logit_bias") is None:
                raise ValueError("loss siglip needs a logit bias: model.head.init_logit_bias (SigLIP: -10)")
            return fn(out["image_features"], out["text_features"], out["logit_scale"], out["logit_bias"])
        return fn(out["image_features"], out["text_features"], out["logit_scale"])

    # ------------------------------------------------------------------ training
    def training_step(self, model: Callable[..., Any], batch: Any) -> StepOutput:
        head = unwrap_model(model).head
        index, texts, _ = self.texts_of(batch, train=True)
        if not index:
            raise ValueError(
                f"a training batch of {len(batch.key)} samples holds only held-out classes; nothing to train on"
            )
        if len(index) < len(batch.key):
            self.dropped += len(batch.key) - len(index)
            batch = batch.select(index)
        args, kwargs = self.model_inputs(batch)
        out, aux = model(
            *args, return_aux=True, head_inputs=self.text_inputs(head, texts, batch.inputs.device), **kwargs
        )
        loss = self.loss(out)
        total = loss + aux if isinstance(aux, torch.Tensor) else loss
        metrics = {"loss": loss.detach(), "logit_scale": out["logit_scale"].detach()}
        return StepOutput(total, metrics, len(index))

    # ------------------------------------------------------------------ evaluation
    def new_metrics(self, device: torch.device) -> ContrastiveMetrics:
        names = self.class_names if self.text == "class" else ()
        return ContrastiveMetrics(device, self.recall_k, names, self.metrics)

    @torch.no_grad()
    def class_embeddings(self, head: ContrastiveHead, device: torch.device) -> dict[str, torch.Tensor]:
        """Per class name, the normalised mean of its prompts' normalised embeddings (the prompt ensemble)."""
        out = {}
        for name in self.class_names:
            prompts = [fill_template(t, name) for t in self.templates]
            emb = head.project_text(self.text_inputs_embeds(head, prompts, device), normalize=True)
            out[name] = F.normalize(emb.mean(0), dim=-1).float().cpu()
        return out

    def text_inputs_embeds(self, head: ContrastiveHead, texts: list[str], device: torch.device) -> torch.Tensor:
        inputs = self.text_inputs(head, texts, device)
        return inputs["text_embeds"] if "text_embeds" in inputs else head.text_embeds(inputs["text"])

    def evaluate_step(self, model: Callable[..., Any], batch: Any, metrics: Metrics) -> None:
        if not isinstance(metrics, ContrastiveMetrics):
            raise TypeError(f"ContrastiveTask evaluates into ContrastiveMetrics, got {type(metrics).__name__}")
        head = unwrap_model(model).head
        device = batch.inputs.device
        _, texts, held = self.texts_of(batch, train=False)
        if self.text == "class" and not metrics.texts:
            metrics.texts = self.class_embeddings(head, device)
        if self.text == "txt":
            inputs = self.text_inputs(head, texts, device)
        else:  # the loss of a class batch pairs each item with its first template's prompt
            inputs = self.text_inputs(head, [fill_template(self.templates[0], t) for t in texts], device)
        args, kwargs = self.model_inputs(batch)
        out = model(*args, head_inputs=inputs, **kwargs)
        with torch.autocast(device.type, enabled=False):
            loss = self._eval_loss(out)
        if self.text == "txt":
            for t, f in zip(texts, out["text_features"].float().cpu()):
                metrics.texts.setdefault(t, f)
        metrics.add(loss, out["image_features"], texts, held)

    def _eval_loss(self, out: dict[str, Any]) -> torch.Tensor:
        """open_clip's loss of one evaluation batch on this rank alone (no collective: ranks may see different
        counts)."""
        from open_clip.loss import ClipLoss, SigLipLoss

        img, txt, scale = out["image_features"].float(), out["text_features"].float(), out["logit_scale"].float()
        if self.loss_name == "siglip":
            return SigLipLoss()(img, txt, scale, out["logit_bias"].float())
        return ClipLoss()(img, txt, scale)

    def chance(self) -> dict[str, float] | None:
        if self.text != "class":
            return None
        c = len(self.class_names)
        return {"acc1": 1 / c, "mean_per_class_recall": 1 / c}

    def extra_repr(self) -> str:
        held = f", held_out_classes={self.held_out_classes}" if self.held_out_classes else ""
        return f"loss={self.loss_name!r}, text={self.text!r}{held}"
