"""Check that a refactor changed no behaviour: the encoders of every shipped config and a short training run, here
and at an earlier revision, with the same seed.

    python bench/compare_revision.py --base d2cb133            # every config builds the same encoder
    python bench/compare_revision.py --base d2cb133 --train    # + a 40-step digits run: same metrics and weights

The base revision is exported with ``git archive`` into a temporary folder and run in a subprocess of its own (each
tree imports its own ``mmblocks``), with each tree's own copy of the configs. Encoders are built with
``num_classes=5`` (no shards are read), frozen-tower ``model.init`` checkpoints switched off, and random LLM blocks
seeded by ``train.seed`` as training does. Prints the configs that differ (none when behaviour is unchanged).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BUILD = r"""
import glob, sys, warnings, torch
warnings.simplefilter("ignore")
tree, out = sys.argv[1], sys.argv[2]
sys.path.insert(0, tree)
from mmblocks.builders import build_encoder
from mmblocks.config import load_config
found = {}
for path in sorted(glob.glob(f"{tree}/configs/**/*.yaml", recursive=True)):
    cfg = load_config(path, ["model.init.checkpoint=null", "data.root=/nonexistent"])
    if cfg["model"]["llm"]["seed"] is None:
        cfg["model"]["llm"]["seed"] = cfg["train"]["seed"]
    torch.manual_seed(0)
    enc = build_encoder(cfg, num_classes=5, verbose=False)
    found[path.split("configs/")[1]] = ({k: v.clone() for k, v in enc.state_dict().items()}, enc.head.pool)
torch.save(found, out)
"""

TRAIN = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
tree, data, out, tune = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
sys.path.insert(0, tree)
overrides = [f"data.root={data}", f"train.out_dir={out}", "data.channels=1", "data.image_size=16",
             "model.backbone.img_size=16", "model.backbone.patch_size=4", "model.backbone.depth=2",
             "model.backbone.embed_dim=32", "model.backbone.num_heads=2", "model.backbone.drop_path_rate=0.1",
             "data.batch_size=64", "data.num_workers=2", "data.augment=true", "train.lr=3e-3", "train.warmup_steps=2",
             "train.tensorboard=false", "train.progress=false", "train.log_every=1", "train.epochs=2",
             "train.label_smoothing=0.1", "model.llm.enabled=true", f"model.llm.tune={tune}", "model.head.dropout=0.1"]
config = f"{tree}/configs/image/digits_vit_tiny_smollm2.yaml"
try:
    from mmblocks.recipes import train
    summary = train(config, overrides)
except ImportError:  # before the config-driven entry point moved out of mmblocks.train
    from mmblocks.train import train
    summary = train(config, overrides)
print(json.dumps({"test": {k: summary["test"][k] for k in ("loss", "acc")}, "best": summary["best_val"]}))
"""


def _run(code: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--base", required=True, help="the revision to compare with (e.g. the commit before a refactor)"
    )
    parser.add_argument("--train", action="store_true", help="also compare a 40-step digits training run")
    parser.add_argument(
        "--tune", default="random", help="model.llm.tune of the training run (random: a SmolLM2-shaped random block)"
    )
    args = parser.parse_args()

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", args.base], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive.stdout, check=True)
        results = {}
        for tag, tree in (("base", base), ("here", REPO)):
            _run(BUILD, str(tree), f"{tmp}/{tag}.pt")
            results[tag] = torch.load(f"{tmp}/{tag}.pt", weights_only=False)
        differ = []
        for name, (state, pool) in results["base"].items():
            mine, my_pool = results["here"].get(name, ({}, None))
            same = state.keys() == mine.keys() and all(torch.equal(state[k], mine[k]) for k in state)
            if not same or pool != my_pool:
                differ.append(name)
        print(f"{len(results['base'])} configs built in both trees; encoders that differ: {differ or 'none'}")

        if args.train:
            from safetensors.torch import load_file

            sys.path.insert(0, str(REPO))
            from mmblocks.data import make_dataset
            from mmblocks.train import latest_checkpoint

            make_dataset("digits", f"{tmp}/digits", progress=False)
            runs = {}
            for tag, tree in (("base", base), ("here", REPO)):
                out = f"{tmp}/run-{tag}"
                summary = json.loads(_run(TRAIN, str(tree), f"{tmp}/digits", out, args.tune).strip().splitlines()[-1])
                weights = load_file(str(latest_checkpoint(f"{out}/checkpoints") / "model.safetensors"))
                records = [json.loads(line) for line in Path(f"{out}/metrics.jsonl").read_text().splitlines()]
                train_rows = [(r["step"], r["loss"], r["acc"]) for r in records if r["split"] == "train"]
                runs[tag] = (summary, weights, train_rows)
                print(f"{tag}: {json.dumps(summary)}")
            (sa, wa, ra), (sb, wb, rb) = runs["base"], runs["here"]
            same_weights = wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
            print(
                f"same summary: {sa == sb}; same per-step train loss/acc ({len(ra)} steps): {ra == rb}; "
                f"same final weights ({len(wa)} tensors): {same_weights}"
            )


if __name__ == "__main__":
    main()
