"""The `mmblocks` command line.

mmblocks train CONFIG [key=value ...] [--resume | --overwrite]   (also under `torchrun --nproc_per_node N -m mmblocks`)
mmblocks eval CONFIG --checkpoint CKPT [key=value ...]
mmblocks study CONFIG [--arms a,b] [--seeds N] [--set key=v1,v2] [--jobs K] [--reference ARM] [key=value ...]
mmblocks shards write --modality image|points|audio|video --from-folder DIR | --from-manifest FILE --out OUT [--split S]
mmblocks shards make digits|textures|meshes|keywords|moving-digits --out DIR [--seed S] [--set KEY=VALUE ...]
mmblocks demo [--quick]
mmblocks blocks families | show SOURCE [--layers ...] [--no-controls]
mmblocks blocks analyze [SOURCE] --checkpoint RUN [--data SHARDS] | maps RUN [RUN ...] [--data SHARDS]
mmblocks reference [--write README.md]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main", "build_parser"]


def _parse_layers(text: str) -> list[int] | range:
    """`-1`, `3,5,7` or `10:14` (a Python-style range)."""
    if ":" in text:
        start, stop = text.split(":", 1)
        return range(int(start), int(stop))
    return [int(v) for v in text.split(",") if v.strip()]


def _command_line() -> str:
    return "mmblocks " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mmblocks")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "(not installed)"


def _is_main_rank() -> bool:
    """Rank 0 of a `torchrun` job, or a plain process: the one that prints results."""
    return int(os.environ.get("RANK", "0")) == 0


# ----------------------------------------------------------------------------------------------- commands
def _cmd_train(args: argparse.Namespace) -> int:
    from .recipes import train

    summary = train(args.config, args.overrides, resume=args.resume, overwrite=args.overwrite)
    test = summary.get("test") or {}
    if test and _is_main_rank():
        print(_test_line(test))
    return 0


def _test_line(test: dict) -> str:
    """``test accuracy 0.9500 on 270 samples`` (classification) or the task's metrics (``test wer 0.5411, cer ...``)."""
    n = int(test.get("samples", 0))
    if "acc" in test:
        return f"test accuracy {test['acc']:.4f} on {n} samples"
    shown = ", ".join(f"{k} {v:.4f}" for k, v in test.items() if k not in ("samples", "lost") and isinstance(v, float))
    return f"test {shown} on {n} samples"


def _cmd_eval(args: argparse.Namespace) -> int:
    from .recipes import default_eval_dir, evaluate_checkpoint

    out = args.out if args.out is not None else default_eval_dir(args.checkpoint)
    results = evaluate_checkpoint(
        args.config, args.checkpoint, args.overrides, splits=tuple(args.splits or ()), out_dir=out
    )
    if _is_main_rank():
        print(json.dumps(results, indent=1))
        if out is not None:
            print(f"metrics and predictions: {out}", file=sys.stderr)
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    from .study import read_study, run_study

    spec = read_study(
        args.config,
        arms=[a.strip() for a in args.arms.split(",") if a.strip()] if args.arms else None,
        seeds=args.seeds,
        sweep=args.sweep,
        reference=args.reference,
        overrides=args.overrides,
        metric=args.metric,
        jobs=args.jobs,
        out=args.out,
    )
    data = run_study(spec, dry_run=args.dry_run)
    return 1 if any(g["failed"] for g in data.get("groups", [])) else 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from .config import ConfigError
    from .inspect_runs import analyze_blocks

    layers = None
    if args.layers:
        try:
            layers = list(_parse_layers(args.layers))
        except ValueError as err:
            raise ConfigError(f"--layers {args.layers!r}: expected '-1', '3,5' or '10:14' ({err})") from None
    analyze_blocks(
        args.checkpoint,
        args.source,
        data=args.data,
        layers=layers,
        split=args.split,
        samples=args.samples,
        out=args.out,
    )
    return 0


def _cmd_maps(args: argparse.Namespace) -> int:
    from .inspect_runs import activation_maps

    names = [n.strip() for n in args.names.split(",")] if args.names else None
    activation_maps(args.runs, names, data=args.data, split=args.split, samples=args.samples, out=args.out)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from .recipes import generate_text

    texts = generate_text(
        args.config, args.checkpoint, args.input, args.prompt, args.overrides, max_new_tokens=args.max_new_tokens
    )
    for path, text in zip(args.input, texts):
        print(f"{path}\t{text}" if len(args.input) > 1 else text)
    return 0


def _cmd_zeroshot(args: argparse.Namespace) -> int:
    from .config import ConfigError
    from .zeroshot_report import load_mmblocks_run, load_open_clip, run_zeroshot

    source, _, name = args.model.partition(":")
    if source not in ("open_clip", "mmblocks") or not name:
        raise ConfigError(
            f"--model {args.model!r}: give open_clip:NAME (a built-in architecture, with --checkpoint FILE), "
            "open_clip:local-dir:PATH or mmblocks:RUN_DIR (a task: contrastive run)"
        )
    if source == "mmblocks":
        if args.checkpoint is not None:
            raise ConfigError("an mmblocks run carries its own weights (its best checkpoint); drop --checkpoint")
        model = load_mmblocks_run(name, args.data, device=args.device)
    else:
        model = load_open_clip(name, args.checkpoint, device=args.device)
    report = run_zeroshot(
        model,
        args.data,
        split=args.split,
        task=args.task,
        classnames=args.classnames,
        templates=args.templates,
        out=args.out,
        batch_size=args.batch_size,
        num_workers=args.workers,
        device=args.device,
    )
    print(" ".join(f"{k} {v:.4f}" for k, v in report["metrics"].items()))
    print(f"report: {report['out']}/zeroshot.md")
    return 0


def _cmd_shards_write(args: argparse.Namespace) -> int:
    from .data import write_from_folder, write_from_manifest

    kwargs = dict(
        split=args.split,
        max_count=args.max_count,
        max_bytes=args.max_bytes,
        modality=args.modality,
        command=_command_line(),
    )
    if args.reencode:
        kwargs["reencode"] = args.reencode
    kwargs["overwrite"] = args.overwrite
    if args.from_folder:
        info = write_from_folder(args.from_folder, args.out, **kwargs)
    else:
        info = write_from_manifest(args.from_manifest, args.out, **kwargs)
    print(json.dumps(info, indent=1, default=str)[:2000])
    return 0


def _cmd_shards_make(args: argparse.Namespace) -> int:
    import yaml

    from .config import ConfigError
    from .data import make_dataset

    kwargs = {}
    for item in args.set or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. samples_per_class=[200,40,40]")
        kwargs[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    info = make_dataset(args.name, args.out, seed=args.seed, overwrite=args.overwrite, **kwargs)
    splits = info.get("splits", {})
    counts = {k: v.get("num_samples", v) if isinstance(v, dict) else v for k, v in splits.items()}
    print(f"wrote {args.name} to {args.out}: {counts}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    data = run_demo(quick=args.quick, out=args.out, epochs=args.epochs, seeds=args.seeds, jobs=args.jobs)
    return 1 if any(g["failed"] for g in data["groups"]) else 0


def _cmd_blocks_demo(args: argparse.Namespace) -> int:
    from .demo import run_blocks_demo

    run_blocks_demo(source=args.source, layer=args.layer)
    return 0


def _cmd_families(args: argparse.Namespace) -> int:
    from .llm.survey import survey_markdown, timed_survey

    rows, seconds = timed_survey(check=args.check, model_types=args.model_types or None)
    if args.markdown:
        print(survey_markdown(rows, seconds if args.check else None), end="")
        return 0
    head = ("model_type", "status", "layers", "final norm", "positions", "moe")
    print(f"{head[0]:<26} {head[1]:<10} {head[2]:<16} {head[3]:<16} {head[4]:<9} {head[5]:<4} entry / reason")
    for r in rows:
        s = r.spec
        if s is None:
            print(f"{r.model_type:<26} {r.status:<10} {'-':<16} {'-':<16} {'-':<9} {'':<4} {r.reason}")
            continue
        note = s.entry or r.reason
        moe = "yes" if s.moe else ""
        norm = s.final_norm or "-"
        print(f"{r.model_type:<26} {r.status:<10} {s.layers:<16} {norm:<16} {s.positions:<9} {moe:<4} {note}")
    return 0


def _cmd_reference(args: argparse.Namespace) -> int:
    from .reference import reference_markdown, write_reference

    if args.write:
        changed = write_reference(args.write)
        print(f"{args.write}: {'updated' if changed else 'already up to date'}")
    else:
        print(reference_markdown(), end="")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    import torch

    from .config import ConfigError
    from .errors import USER_ERRORS
    from .llm import load_blocks

    try:
        layers = _parse_layers(args.layers)
    except ValueError as err:
        raise ConfigError(f"--layers {args.layers!r}: expected '-1', '3,5' or '10:14' ({err})") from None
    wiring = {
        "attention": args.attention,
        "rope": args.rope,
        "final_norm": args.final_norm,
        "attn_implementation": args.attn_implementation,
    }
    try:
        blocks = load_blocks(args.source, layers, tune=args.tune, **wiring)
    except (ValueError, IndexError) as err:  # a layer out of range, a backend the family lacks, ...
        if isinstance(err, USER_ERRORS):
            raise
        raise ConfigError(f"blocks show {args.source}: {err}") from err
    print(blocks)
    print(blocks.parameter_table())
    with torch.no_grad():
        y = blocks(torch.randn(1, 8, blocks.hidden_size))
    print(f"forward [1, 8, {blocks.hidden_size}] -> {list(y.shape)}, finite={bool(torch.isfinite(y).all())}")
    if args.controls:
        _print_control_updates(args.source, layers, wiring)
    return 0


def _print_control_updates(source: str, layers: list[int] | range, wiring: dict[str, Any]) -> None:
    """The update RMS of the pretrained layers and of each frozen control on the same inputs."""
    from .analysis import control_update_rms

    rows = control_update_rms(source, layers, **wiring)
    names = [k for k in rows[0] if k != "tune"]
    print("\nupdate RMS ||layers(x) - x|| / ||x|| (before the final norm), same inputs for every row:")
    print("| tune | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for row in rows:
        label = "frozen (pretrained)" if row["tune"] == "frozen" else row["tune"]
        print(f"| {label} | " + " | ".join(f"{row[n]:.3g}" for n in names) + " |")


# ----------------------------------------------------------------------------------------------- parser
def _run_data_arguments(parser: argparse.ArgumentParser, out_default: str | None, out_help: str) -> None:
    """--data / --split / --samples / --out of the commands that look inside trained runs."""
    parser.add_argument("--data", help="shards folder (default: the run's data.root)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--samples", type=int, default=256, help="samples to run through (default 256)")
    parser.add_argument("--out", default=out_default, help=out_help)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; every choice list is the constant or registry the code uses."""
    from .data import MODALITY_KEYS, list_datasets
    from .llm import ATTENTION_MODES, FINAL_NORMS, ROPE_MODES, TUNE_MODES

    parser = argparse.ArgumentParser(
        prog="mmblocks", description="Non-text modalities through the transformer blocks of pretrained LLMs."
    )
    parser.add_argument("--version", action="version", version=f"mmblocks {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="train an encoder from a YAML config")
    tr.add_argument("config", help="YAML config (configs/image/...)")
    tr.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.lr=3e-4 data.batch_size=32")
    again = tr.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.out_dir")
    again.add_argument(
        "--overwrite",
        action="store_true",
        help="train.out_dir holds a previous run: move it aside (to <out_dir>.old-<time>) and start afresh",
    )
    tr.set_defaults(func=_cmd_train)

    st = sub.add_parser(
        "study", help="arms x seeds (x a sweep) over recipes, resumable, with paired differences and 95%% intervals"
    )
    st.add_argument("config", help="a recipe YAML, or a study YAML (a study: section naming recipes, arms, seeds...)")
    st.add_argument("overrides", nargs="*", help="key.path=value overrides for every run")
    st.add_argument(
        "--arms",
        help="comma-separated arm names (default: the study file's, else baseline, frozen, "
        "shuffled, random_matched, random, scratch)",
    )
    st.add_argument("--seeds", type=int, help="seeds 0..N-1 (default: the study file's, else 3)")
    st.add_argument(
        "--set",
        dest="sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="sweep a key over values (repeatable: the grid is their product), e.g. model.llm.layers=[-1],[-4],[-8]",
    )
    st.add_argument("--reference", help="the arm every other is compared with (default: baseline)")
    st.add_argument("--metric", help="the test metric to compare (default: the task's monitored metric)")
    st.add_argument("--jobs", type=int, help="runs side by side, the cores shared among them (default 1)")
    st.add_argument("--out", help="study folder (default: runs/study/<config stem>)")
    st.add_argument("--dry-run", action="store_true", help="print the runs still to do, run nothing")
    st.set_defaults(func=_cmd_study)

    ev = sub.add_parser("eval", help="evaluate a checkpoint on the val/test splits")
    ev.add_argument("config")
    ev.add_argument("overrides", nargs="*", help="key.path=value overrides")
    ev.add_argument("--checkpoint", required=True, help="a step-* checkpoint folder or a checkpoints folder")
    ev.add_argument("--splits", nargs="*", help="splits to evaluate (default: val and test)")
    ev.add_argument(
        "--out", help="folder for metrics.json, predictions_<split>.jsonl and eval.md (default: <run>/eval/<step>)"
    )
    ev.set_defaults(func=_cmd_eval)

    ge = sub.add_parser("generate", help="the text a trained prefix-LM model writes for image / audio / video files")
    ge.add_argument("config", help="the config the checkpoint was trained with")
    ge.add_argument("overrides", nargs="*", help="key.path=value overrides")
    ge.add_argument("--checkpoint", required=True, help="a step-* folder, a checkpoints or run folder")
    ge.add_argument("--input", required=True, action="append", help="an image / audio / video file (repeatable)")
    ge.add_argument("--prompt", help="the question (qa tasks) or the instruction (default: the training prompt)")
    ge.add_argument("--max-new-tokens", type=int, help="generation budget (default: the task's)")
    ge.set_defaults(func=_cmd_generate)

    zs = sub.add_parser("zeroshot", help="zero-shot classification / retrieval of shards by a CLIP-like model")
    zs.add_argument(
        "--model",
        required=True,
        help="open_clip:NAME (built-in architecture), open_clip:local-dir:PATH or mmblocks:RUN_DIR (contrastive run)",
    )
    zs.add_argument("--checkpoint", help="weights file of a built-in open_clip architecture (nothing is downloaded)")
    zs.add_argument("--data", required=True, help="shards folder (with index.json)")
    zs.add_argument("--split", default="test")
    zs.add_argument("--task", choices=("classification", "retrieval"), default="classification")
    zs.add_argument("--classnames", help="a JSON list or one class name per line (default: the shards' index.json)")
    zs.add_argument("--templates", help="a JSON list of {c} templates or {class: [prompts]}, or one per line")
    zs.add_argument("--out", help="report folder (default: runs/zeroshot/<data folder>)")
    zs.add_argument("--batch-size", type=int, default=64)
    zs.add_argument("--workers", type=int, default=2)
    zs.add_argument("--device", default="cpu")
    zs.set_defaults(func=_cmd_zeroshot)

    sh = sub.add_parser("shards", help="write WebDataset shards")
    ssub = sh.add_subparsers(dest="shards_command", required=True)
    wr = ssub.add_parser("write", help="shards from an ImageFolder tree or a manifest (jsonl/csv)")
    wr.add_argument(
        "--modality",
        default="image",
        choices=list(MODALITY_KEYS),
        help="image: jpg/png/webp; points: .npy [P, 3+C] float; audio: .flac/.wav; video: .mp4 (default: image)",
    )
    src = wr.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-folder", help="one sub-folder per class")
    src.add_argument("--from-manifest", help=".jsonl or .csv with path, label[, caption]")
    wr.add_argument("--out", required=True, help="output folder (index.json + shards)")
    wr.add_argument("--split", default="train")
    wr.add_argument("--max-count", type=int, default=10000, help="samples per shard")
    wr.add_argument("--max-bytes", default="1GB", help="bytes per shard, e.g. 256MB")
    wr.add_argument("--reencode", default=None, help="re-encode images to this format (default: keep as is)")
    wr.add_argument("--overwrite", action="store_true", help="replace the split when OUT already has it")
    wr.set_defaults(func=_cmd_shards_write)
    mk = ssub.add_parser("make", help="build an offline dataset from data shipped in installed packages")
    mk.add_argument("name", choices=list_datasets())
    mk.add_argument("--out", required=True)
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--overwrite", action="store_true", help="replace the dataset already in OUT")
    mk.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="a keyword argument of the maker, value in YAML (repeatable), e.g. --set points=2048 "
        "--set samples_per_class=[200,40,40]",
    )
    mk.set_defaults(func=_cmd_shards_make)

    demo = sub.add_parser(
        "demo", help="baseline / + frozen SmolLM2 block / + shuffled block on textures, paired by seed (a small study)"
    )
    demo.add_argument("--seeds", type=int, default=1, help="seeds per arm (default 1: says plainly it cannot decide)")
    demo.add_argument("--jobs", type=int, default=1, help="runs side by side")
    demo.add_argument("--quick", action="store_true", help="tiny settings (seconds; for tests)")
    demo.add_argument("--out", default="runs/demo", help="where runs and the comparison go")
    demo.add_argument("--epochs", type=int, default=3, help="epochs per arm (default 3: a few minutes each on CPU)")
    demo.set_defaults(func=_cmd_demo)

    ref = sub.add_parser("reference", help="the registries, load_blocks and every config key, as markdown")
    ref.add_argument("--write", metavar="FILE", help="replace the generated section of FILE (README.md) instead")
    ref.set_defaults(func=_cmd_reference)

    blocks = sub.add_parser("blocks", help="inspect LLM blocks")
    bsub = blocks.add_subparsers(dest="blocks_command", required=True)
    bdemo = bsub.add_parser("demo", help="load a real SmolLM2 block, run it, print its parameter tables")
    bdemo.add_argument("--source", default="smollm2-135m")
    bdemo.add_argument("--layer", type=int, default=-1)
    bdemo.set_defaults(func=_cmd_blocks_demo)
    fam = bsub.add_parser(
        "families", help="every causal-LM architecture of transformers: what discovery finds (--check: the oracle)"
    )
    fam.add_argument("--check", action="store_true", help="build a tiny model of each and compare its forward (~3 min)")
    fam.add_argument("--markdown", action="store_true", help="print the README family table")
    fam.add_argument("model_types", nargs="*", help="only these model types (default: every causal-LM architecture)")
    fam.set_defaults(func=_cmd_families)
    an = bsub.add_parser(
        "analyze", help="every layer of an LLM on a trained run's real tokens: Block Influence, update RMS, CKA"
    )
    an.add_argument("source", nargs="?", help="the LLM whose layers to scan (default: the run's)")
    an.add_argument("--checkpoint", required=True, help="a run folder (or its checkpoint) with an LLM stage")
    an.add_argument("--layers", help="'10:20' or '-1,-4,-8' (default: all; write --layers=-1,-4)")
    _run_data_arguments(an, None, "folder for blocks.md / .json / .png (default: <run>/analysis)")
    an.set_defaults(func=_cmd_analyze)
    mp = bsub.add_parser(
        "maps", help="token-norm maps before / after the LLM stage of runs, and their foreground AUC (images)"
    )
    mp.add_argument("runs", nargs="+", help="run folders (e.g. the baseline, frozen and control arms of a study)")
    mp.add_argument("--names", help="comma-separated names for the runs (default: their folder names)")
    _run_data_arguments(mp, "runs/activation_maps", "folder for maps.md / .json / .png")
    mp.set_defaults(func=_cmd_maps)
    show = bsub.add_parser("show", help="load layers from a source and print them with their parameter table")
    show.add_argument("source", help="model folder, .gguf file, offline name (smollm2-135m) or random:<family>")
    show.add_argument("--layers", default="-1", help="'-1', '3,5' or '10:14' (default: -1)")
    show.add_argument("--attention", default="bidirectional", choices=ATTENTION_MODES)
    show.add_argument("--rope", default="none", choices=ROPE_MODES)
    show.add_argument("--final-norm", default="rms_unit", choices=FINAL_NORMS)
    show.add_argument("--tune", default="frozen", choices=TUNE_MODES)
    show.add_argument("--attn-implementation", default=None)
    show.add_argument(
        "--no-controls",
        dest="controls",
        action="store_false",
        help="skip the update-RMS table of the pretrained layers vs the shuffled / random_matched / random controls",
    )
    show.set_defaults(func=_cmd_show)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; a user-facing error (`mmblocks.errors.USER_ERRORS`: a bad config value, missing shards,
    an unknown model) is printed as one line with exit code 2, anything else keeps its traceback."""
    from .errors import USER_ERRORS

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # inside the try: a reader that left (`| head`) is noticed here, not at exit
        return code
    except USER_ERRORS as err:
        print(f"mmblocks: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `mmblocks blocks families | head`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # python's exit-time flush of stdout must not fail again
        return 1


if __name__ == "__main__":
    sys.exit(main())
