"""The `mmblocks` command line: `mmblocks demo`, `mmblocks blocks families|show`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _parse_layers(text: str) -> list[int] | range:
    """`-1`, `3,5,7` or `10:14` (a Python-style range)."""
    if ":" in text:
        start, stop = text.split(":", 1)
        return range(int(start), int(stop))
    return [int(v) for v in text.split(",") if v.strip()]


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(source=args.source, layer=args.layer)
    return 0


def _cmd_families(args: argparse.Namespace) -> int:
    from .llm import FAMILIES

    print(f"{'model_type':<18} {'layers':<16} {'final norm':<22} {'positions':<30} norm")
    for name, spec in sorted(FAMILIES.items()):
        print(f"{name:<18} {spec.layers:<16} {spec.final_norm or '-':<22} {spec.positions:<30} {spec.norm}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    import torch

    from .llm import load_blocks

    blocks = load_blocks(
        args.source,
        _parse_layers(args.layers),
        attention=args.attention,
        rope=args.rope,
        final_norm=args.final_norm,
        tune=args.tune,
        attn_implementation=args.attn_implementation,
    )
    print(blocks)
    print(blocks.parameter_table())
    with torch.no_grad():
        y = blocks(torch.randn(1, 8, blocks.hidden_size))
    print(f"forward [1, 8, {blocks.hidden_size}] -> {list(y.shape)}, finite={bool(torch.isfinite(y).all())}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmblocks", description="Non-text modalities through the transformer blocks of pretrained LLMs."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="load a real SmolLM2 block, run it, print its parameter tables")
    demo.add_argument("--source", default="smollm2-135m", help="model to take the block from")
    demo.add_argument("--layer", type=int, default=-1, help="layer index (negative counts from the end)")
    demo.set_defaults(func=_cmd_demo)

    blocks = sub.add_parser("blocks", help="inspect LLM blocks")
    bsub = blocks.add_subparsers(dest="blocks_command", required=True)
    fam = bsub.add_parser("families", help="list the supported transformers architectures")
    fam.set_defaults(func=_cmd_families)
    show = bsub.add_parser("show", help="load layers from a source and print them with their parameter table")
    show.add_argument("source", help="model folder, .gguf file, offline name (smollm2-135m) or random:<family>")
    show.add_argument("--layers", default="-1", help="'-1', '3,5' or '10:14' (default: -1)")
    show.add_argument("--attention", default="bidirectional", choices=["bidirectional", "causal"])
    show.add_argument("--rope", default="none", choices=["none", "native"])
    show.add_argument("--final-norm", default="rms_unit", choices=["none", "rms_unit", "llm"])
    show.add_argument("--tune", default="frozen")
    show.add_argument("--attn-implementation", default=None)
    show.set_defaults(func=_cmd_show)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, IndexError, KeyError, FileNotFoundError, ImportError) as err:
        print(f"mmblocks: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
