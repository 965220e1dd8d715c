"""Train the three arms of each points / audio / video recipe (or the adapter comparison) and print a table.

    python bench/run_recipes.py                           # every recipe in configs/{points,audio,video}
    python bench/run_recipes.py --only meshes keywords --epochs 5 --seeds 0 1
    python bench/run_recipes.py --out runs/recipes        # reports per arm + comparison.md there
    python bench/run_recipes.py --only adapters           # issue 5: six adapters under one frozen tower

Each arm runs `mmblocks.recipes.build_trainer(config).fit()` on its config as written (the datasets are made when
missing), with ``train.out_dir``, ``train.seed`` and optionally ``train.epochs`` overridden. The table gives test
accuracy, the best validation accuracy, trainable / frozen parameters, training throughput and wall time, one line per
arm and seed.
These are the figures quoted in the closing notes; they are single small runs on CPU, not the papers' settings.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ARMS = (("baseline", ""), ("+ frozen SmolLM2 block", "_smollm2"), ("+ random-init block", "_smollm2_random"))
RECIPES = {
    "meshes": "configs/points/meshes_point_bert",
    "keywords": "configs/audio/keywords_ast_tiny",
    "moving-digits-tubelets": "configs/video/moving_digits_tubelets",
    "moving-digits-motion": "configs/video/moving_digits_motion",
}
GROUPS: dict[str, list[tuple[str, str]]] = {
    group: [(arm, f"{stem}{suffix}.yaml") for arm, suffix in ARMS] for group, stem in RECIPES.items()
}
# issue 5's adapter comparison: one frozen tower (trained first when its checkpoint is missing), adapters swapped
ADAPTERS = ("linear", "mlp", "pool", "pixel_shuffle", "qformer", "perceiver")
GROUPS["adapters"] = [(name, f"configs/image/adapters/textures_{name}.yaml") for name in ADAPTERS]
TOWER = "configs/image/textures_tower_vit_tiny_p4.yaml"


def _tokens_into_llm(trainer) -> int | None:
    """Tokens per sample entering the LLM stage (one test batch through a forward hook)."""
    model = trainer.model
    if model.llm_stage is None:
        return None
    seen: dict[str, int] = {}
    handle = model.llm_stage.blocks.register_forward_hook(lambda m, a, out: seen.update(n=out.x.shape[1]))
    try:
        batch = next(iter(trainer.eval_loaders["test"]))
        args, kwargs = batch.to(trainer.device).model_inputs()
        model.eval()
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        handle.remove()
    return seen.get("n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=list(RECIPES), choices=list(GROUPS))
    parser.add_argument("--epochs", type=int, default=None, help="override the configs' epoch count")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--out", default="runs/recipes")
    parser.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every arm")
    args = parser.parse_args()

    from mmblocks.recipes import build_trainer
    from mmblocks.train import compare_runs_table

    out = Path(args.out)
    rows = []
    for group in args.only:
        if group == "adapters" and not (REPO / "runs/textures_tower_vit_tiny_p4/checkpoints").is_dir():
            tower = build_trainer(REPO / TOWER, ["train.progress=false", *args.set])
            try:
                tower.fit()
            finally:
                tower.close()
        for arm, path in GROUPS[group]:
            config = REPO / path
            for seed in args.seeds:
                name = f"{config.stem}-s{seed}"
                overrides = [f"train.out_dir={out / name}", f"train.seed={seed}", "train.progress=false", *args.set]
                if args.epochs is not None:
                    overrides.append(f"train.epochs={args.epochs}")
                start = time.perf_counter()
                trainer = build_trainer(config, overrides)
                try:
                    summary = trainer.fit()
                    tokens = _tokens_into_llm(trainer)
                finally:
                    trainer.close()
                row = {
                    "recipe": group,
                    "arm": arm,
                    "seed": seed,
                    "epochs": summary["epochs"],
                    "test_acc": summary["test"].get("acc"),
                    "best_val_acc": (summary["best_val"] or {}).get("val_acc"),
                    "trainable": summary["trainable_params"],
                    "frozen": summary["frozen_params"],
                    "llm_tokens": tokens,
                    "samples_per_s": summary["throughput"].get("samples_per_s_per_gpu"),
                    "minutes": (time.perf_counter() - start) / 60,
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    table = compare_runs_table(
        rows,
        [
            "recipe",
            "arm",
            "seed",
            "epochs",
            ("test_acc", "test acc"),
            ("best_val_acc", "best val acc"),
            "trainable",
            "frozen",
            ("llm_tokens", "tokens into the LLM block"),
            ("samples_per_s", "samples/s"),
            "minutes",
        ],
        floatfmt=".3f",
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text(table + "\n")
    (out / "comparison.json").write_text(json.dumps(rows, indent=1))
    print(table)


if __name__ == "__main__":
    main()
