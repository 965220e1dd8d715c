"""What an LLM block does to the tokens it is given: update RMS, Block Influence, linear CKA, and the LM's own
hidden states at a layer (the scale a block was trained to receive).

These are the measurements behind the controls of "does a frozen pretrained block help?": a control is only a
control if its update has the pretrained block's scale (`update_rms`), and an adapter feeding a block is only
comparable to text if its output has the scale of the LM's own hidden states there (`text_hidden_states`).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from tokenizers_mm import Tokens

from ..llm import LLMBlocks

__all__ = [
    "CONTROL_TUNES",
    "REFERENCE_TEXT",
    "block_influence",
    "control_update_rms",
    "layer_outputs",
    "linear_cka",
    "text_hidden_states",
    "text_rms",
    "update_rms",
]

# A few plain English sentences: the LM's hidden states on them are the "real text" inputs of a block.
REFERENCE_TEXT = (
    "The old lighthouse stood at the edge of the cliff, its white paint peeling in the salt wind. Every evening the "
    "keeper climbed the spiral stairs, lit the lamp and wrote the weather in a small leather book. Ships passed far "
    "out at sea, and on clear nights their lights answered his own."
)


@contextlib.contextmanager
def _without_final_norm(blocks: LLMBlocks) -> Iterator[None]:
    """Run `blocks` with its final norm replaced by the identity (the update is measured on the residual stream)."""
    norm = blocks.final_norm
    blocks.final_norm = nn.Identity()
    try:
        yield
    finally:
        blocks.final_norm = norm


@torch.no_grad()
def layer_outputs(blocks: LLMBlocks, x: torch.Tensor | Tokens, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The residual stream after the layers of `blocks`, before its final norm, in eval mode.

    Args:
        x: ``[B, N, D]`` input hidden states, or `Tokens` (their positions feed a 2-D / 3-D rotary).
        mask: ``[B, N]`` bool, True on real tokens (None: all real; `Tokens` carry their own).
    Returns:
        ``[B, N, D]`` float32.
    """
    was = blocks.training
    blocks.eval()
    try:
        with _without_final_norm(blocks):
            inp = x if isinstance(x, Tokens) else Tokens(x=x, mask=mask) if mask is not None else x
            out = blocks(inp)
    finally:
        blocks.train(was)
    return (out.x if isinstance(out, Tokens) else out).float()


def _valid(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return t[mask] if mask is not None else t.reshape(-1, t.shape[-1])


@torch.no_grad()
def update_rms(blocks: LLMBlocks, x: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """``||layers(x) - x|| / ||x||`` over all real tokens (Frobenius norms): the size of the block's residual update
    relative to its input. Near 0: the block is close to the identity on these inputs (``tune: random`` with the
    family's 0.02 init); near or above 1: the update dominates its input.

    Args:
        x: ``[B, N, D]`` (an adapter's output, or `text_hidden_states`).
        mask: ``[B, N]`` bool, True on real tokens.
    """
    x = x.to(blocks.dtype)
    y = layer_outputs(blocks, x, mask)
    xi, yi = _valid(x.float(), mask), _valid(y, mask)
    return float((yi - xi).norm() / xi.norm().clamp_min(1e-12))


def block_influence(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """ShortGPT's Block Influence: the mean over tokens of ``1 - cos(x_t, y_t)`` between a block's input and output
    (``[B, N, D]`` each). 0: the block leaves every token's direction alone."""
    xi, yi = _valid(x.float(), mask), _valid(y.float(), mask)
    return float((1 - torch.nn.functional.cosine_similarity(xi, yi, dim=-1)).mean())


def linear_cka(a: torch.Tensor, b: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) between two sets of features of the same ``M`` examples: ``a`` ``[M, D1]``,
    ``b`` ``[M, D2]``. 1: the same representation up to rotation and scale; 0: unrelated."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(
            f"linear_cka expects [M, D1] and [M, D2] with the same M, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    a = a.double() - a.double().mean(0, keepdim=True)
    b = b.double() - b.double().mean(0, keepdim=True)
    cross = (a.T @ b).norm() ** 2
    denom = (a.T @ a).norm() * (b.T @ b).norm()
    return float(cross / denom.clamp_min(1e-30))


@torch.no_grad()
def text_hidden_states(source: str, layer: int, text: str = REFERENCE_TEXT, skip_first: bool = True) -> torch.Tensor:
    """The LM's own hidden states at the input of `layer` for `text`: what the block was trained to receive.

    Args:
        source: an LM source with weights and a tokenizer (`load_lm` / `load_tokenizer`).
        layer: the layer index (negative allowed).
        skip_first: drop the first position, whose state carries the "attention sink" outliers of most LMs
            (hundreds of times the RMS of the others) and would dominate any norm.
    Returns:
        ``[1, T, D]`` float32.
    """
    from ..llm import load_lm, load_tokenizer

    lm = load_lm(source, tune="frozen")
    tok = load_tokenizer(source)
    ids = tok(text, return_tensors="pt")["input_ids"]
    hidden = lm(input_ids=ids, output_hidden_states=True).hidden_states
    n_layers = len(hidden) - 1
    index = layer if layer >= 0 else n_layers + layer
    if not 0 <= index < n_layers:
        raise ValueError(f"layer {layer} is out of range for {source} ({n_layers} layers)")
    out = hidden[index].float()
    return out[:, 1:] if skip_first else out


def text_rms(source: str, layer: int, text: str = REFERENCE_TEXT) -> float:
    """The RMS of `text_hidden_states` at `layer`: the scale of the states the block was trained on. Measured once
    per (source, layer, text) and kept in ``<cache_dir>/text_rms.json`` (loading the whole LM is the cost)."""
    import hashlib
    import json

    from ..llm import cache_dir, resolve_source

    resolved = resolve_source(source)
    if resolved.kind == "random":
        raise ValueError(f"{source} has no pretrained weights, so no text hidden states: give the RMS as a number")
    n_layers = int(getattr(resolved.config, "num_hidden_layers", 0) or 0)
    index = layer if layer >= 0 or not n_layers else n_layers + layer
    key = f"{resolved.label}|layer {index}|{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    path = cache_dir() / "text_rms.json"
    table = json.loads(path.read_text()) if path.is_file() else {}
    if key not in table:
        states = text_hidden_states(source, index, text)
        table[key] = float(states.pow(2).mean().sqrt())
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        os.replace(tmp, path)  # atomic: parallel runs never read half a file
    return float(table[key])


TEXT_ROW_MAX_PARAMS = 2e9  # control_update_rms runs the whole LM for its text row only below this size
CONTROL_TUNES: tuple[str, ...] = ("frozen", "shuffled", "random_matched", "random")


@torch.no_grad()
def control_update_rms(
    source: str,
    layers: list[int] | range | None = None,
    inputs: dict[str, torch.Tensor] | None = None,
    tunes: tuple[str, ...] = CONTROL_TUNES,
    seed: int = 0,
    **block_kwargs: object,
) -> list[dict[str, object]]:
    """The update RMS of the pretrained layers (``frozen``) and of each control on the same inputs.

    Args:
        source, layers, block_kwargs: as `load_blocks`.
        inputs: name -> ``[B, N, D]`` inputs. Default: unit-RMS Gaussian tokens (an adapter's output at init is of
            this order), the same at the RMS of the LM's own hidden states there, and those hidden states on
            `REFERENCE_TEXT` (when the source has weights and a tokenizer).
    Returns:
        one row per tune: ``{"tune": ..., <input name>: update RMS, ...}``.
    """
    from ..llm import load_blocks, resolve_source

    layers = [-1] if layers is None else layers
    first = load_blocks(source, layers, tune="frozen", seed=seed, **block_kwargs)
    if inputs is None:
        gen = torch.Generator().manual_seed(seed)
        gauss = torch.randn(4, 32, first.hidden_size, generator=gen)
        inputs = {"gaussian, RMS 1": gauss}
        text = None
        config = resolve_source(source).config
        size = 12 * int(getattr(config, "num_hidden_layers", 0) or 0) * int(getattr(config, "hidden_size", 0) or 0) ** 2
        if size > TEXT_ROW_MAX_PARAMS:
            warnings.warn(
                f"{source}: about {size / 1e9:.1f}B parameters; the text row (which runs the whole LM) is left out",
                stacklevel=2,
            )
        elif resolve_source(source).kind != "random":  # a random:<family> LM has no text worth reading
            try:
                text = text_hidden_states(source, first.layer_indices[0])
            except (OSError, ValueError) as err:  # a folder without a tokenizer: the Gaussian rows only
                warnings.warn(f"no text hidden states for {source}: {err}", stacklevel=2)
        if text is not None:
            rms = float(text.pow(2).mean().sqrt())
            inputs[f"gaussian, RMS {rms:.3g} (text's)"] = gauss * rms
            inputs["LM hidden states on text"] = text
    rows = []
    for tune in tunes:
        blocks = first if tune == "frozen" else load_blocks(source, layers, tune=tune, seed=seed, **block_kwargs)
        rows.append({"tune": tune, **{name: update_rms(blocks, x) for name, x in inputs.items()}})
    return rows
