"""`mmblocks blocks families`: every causal-LM architecture of the installed `transformers`, what discovery finds in it
and, with ``check=True``, whether its layers reproduce its own forward (a tiny model built, saved and compared)."""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .discovery import build_meta_model, discover, is_attention_type, iter_causal_lm_types, tiny_config
from .families import FamilySpec

__all__ = ["FamilyStatus", "attention_pair", "survey", "survey_markdown", "timed_survey"]

MAX_PARAMS = 30e6


@dataclass
class FamilyStatus:
    """``status``: ``passes`` / ``differs`` / ``fails`` (mmblocks), ``skipped`` (transformers cannot build or run a
    tiny one here, or it has no attention layer), ``discovered`` (no check asked)."""

    model_type: str
    status: str
    reason: str = ""
    spec: FamilySpec | None = None
    max_error: float | None = None


def attention_pair(config) -> list[int] | None:
    """Two consecutive attention layers (from index 1 if possible), or one, or None: the layers the check loads."""
    text = config.get_text_config()
    kinds = getattr(text, "layer_types", None) or ["full_attention"] * int(text.num_hidden_layers)
    ok = [i for i, t in enumerate(kinds) if is_attention_type(t)]
    for start in (1, 0):
        for i in ok:
            if i >= start and i + 1 in ok:
                return [i, i + 1]
    return ok[:1] or None


def _check_one(model_type: str, check: bool) -> FamilyStatus:
    from .load import load_blocks

    try:
        config = tiny_config(model_type)
        meta = build_meta_model(config)
    except Exception as err:
        return FamilyStatus(model_type, "skipped", f"transformers cannot build a tiny one: {type(err).__name__}")
    try:
        spec = discover(meta.config, meta)
    except Exception as err:
        return FamilyStatus(model_type, "fails", f"discovery: {err}")
    if not check:
        return FamilyStatus(model_type, "discovered", "", spec)
    n = sum(p.numel() for p in meta.parameters())
    if n > MAX_PARAMS:
        return FamilyStatus(model_type, "skipped", f"tiny config still {n / 1e6:.0f}M parameters", spec)
    pair = attention_pair(meta.config)
    if pair is None:
        return FamilyStatus(model_type, "skipped", "no attention layer (state-space / recurrent)", spec)
    try:
        torch.manual_seed(0)
        meta.config._attn_implementation = "eager"
        model = type(meta)._from_config(meta.config).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():  # off their init; fixed sinusoidal tables stay
                if "embed_positions" not in name:
                    p.mul_(-1.5).add_(0.05)
        ids = torch.randint(3, model.config.get_text_config().vocab_size, (2, 12))
        with torch.no_grad():
            hs = model(ids, output_hidden_states=True).hidden_states
    except Exception as err:
        return FamilyStatus(model_type, "skipped", f"transformers cannot run a tiny one: {type(err).__name__}", spec)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            model.save_pretrained(tmp)
        except Exception as err:
            reason = f"transformers cannot save a tiny one: {type(err).__name__}"
            return FamilyStatus(model_type, "skipped", reason, spec)
        try:
            mode = spec.default_attention
            blocks = load_blocks(
                Path(tmp), pair, attention=mode, rope="native", final_norm="none", attn_implementation="eager"
            )
            with torch.no_grad():
                err = float((blocks(hs[pair[0]]) - hs[pair[-1] + 1]).abs().max())
        except Exception as exc:
            return FamilyStatus(model_type, "fails", f"{type(exc).__name__}: {str(exc)[:100]}", spec)
    status = "passes" if err < 1e-4 else "differs"
    return FamilyStatus(model_type, status, "" if status == "passes" else f"max error {err:.1e}", spec, err)


def survey(model_types: list[str] | None = None, check: bool = False, progress: bool = True) -> list[FamilyStatus]:
    """Discover (and, with `check`, run the oracle on) every causal-LM architecture, or `model_types`."""
    from tqdm.auto import tqdm

    types = model_types or iter_causal_lm_types()
    out = []
    hf = logging.getLogger("transformers")
    level = hf.level
    hf.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for t in tqdm(types, desc="families", disable=not progress, leave=False):
                out.append(_check_one(t, check))
    finally:
        hf.setLevel(level)
    return out


def survey_markdown(rows: list[FamilyStatus], seconds: float | None = None) -> str:
    """The README family table: counts, then one row per architecture."""
    import transformers

    counts: dict[str, int] = {}
    for r in rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    entries = sum(1 for r in rows if r.spec is not None and r.spec.entry)
    lines = [
        f"transformers {transformers.__version__}: {len(rows)} causal-LM architectures; "
        + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        + f"; {entries} carry an entry (`mmblocks/llm/families.py`)."
        + (f" Checked in {seconds:.0f} s." if seconds else ""),
        "",
        "| model_type | status | layer | positions | MoE | entry / reason |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r.spec
        layer = f"`{s.layers}` {s.layer_class}" if s else "-"
        note = (s.entry if s and s.entry else "") or r.reason
        moe = "yes" if s and s.moe else ""
        pos = s.positions if s else "-"
        lines.append(f"| {r.model_type} | {r.status} | {layer} | {pos} | {moe} | {note.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def timed_survey(check: bool, model_types: list[str] | None = None) -> tuple[list[FamilyStatus], float]:
    """`survey` and its wall time in seconds."""
    t = time.perf_counter()
    rows = survey(model_types, check=check)
    return rows, time.perf_counter() - t
