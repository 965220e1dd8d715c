"""`mmblocks study`: the grid, its paired statistics against scipy, resumability, and a real two-arm study."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from scipy import stats

from mmblocks.builders import build_encoder
from mmblocks.cli import main
from mmblocks.config import ConfigError
from mmblocks.study import (
    ARMS,
    Cell,
    _command,
    _sentence,
    _state,
    left_chance,
    paired_difference,
    parse_sweep,
    plan_study,
    read_study,
)
from mmblocks.train import seed_everything

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "image" / "digits_vit_tiny_smollm2.yaml"
QUICK = [
    "data.image_size=16",
    "model.backbone.img_size=16",
    "model.backbone.patch_size=4",
    "model.backbone.depth=1",
    "data.batch_size=16",
    "train.max_steps=3",
    "train.epochs=1",
    "train.log_every=1",
    "train.tensorboard=false",
    "data.num_workers=0",
]


def test_parse_sweep_keeps_lists_whole():
    sweep = parse_sweep(["model.llm.layers=[-1],[-4],[-8]", "train.lr=1e-3,3e-4", "model.adapter_in.name=linear,mlp"])
    assert sweep == {
        "model.llm.layers": [[-1], [-4], [-8]],
        "train.lr": ["1e-3", "3e-4"],  # YAML 1.1 reads 1e-3 as a string; the override parser reads it again
        "model.adapter_in.name": ["linear", "mlp"],
    }
    with pytest.raises(ConfigError, match="key=value1,value2"):
        parse_sweep(["model.llm.layers"])


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_paired_difference_equals_scipy(n):
    g = torch.Generator().manual_seed(n)
    ref = {s: float(v) for s, v in enumerate(torch.rand(n, generator=g))}
    arm = {s: v + float(d) for (s, v), d in zip(ref.items(), 0.05 + 0.1 * torch.randn(n, generator=g))}
    arm[99] = 0.5  # a seed only one arm finished is not paired
    d = paired_difference(arm, ref)
    a, b = [arm[s] for s in range(n)], [ref[s] for s in range(n)]
    test = stats.ttest_rel(a, b)
    lo, hi = test.confidence_interval(0.95)
    assert d["n"] == n and d["seeds"] == list(range(n))
    assert d["mean"] == pytest.approx(sum(x - y for x, y in zip(a, b)) / n)
    assert d["ci"] == pytest.approx((lo, hi), rel=1e-9, abs=1e-12)
    pos = sum(x > y for x, y in zip(a, b))
    assert d["positive"] == pos
    assert d["sign_p"] == pytest.approx(stats.binomtest(pos, n, 0.5).pvalue)


def test_paired_difference_one_seed_has_no_interval():
    d = paired_difference({0: 0.7}, {0: 0.6, 1: 0.5})
    assert d["n"] == 1 and "ci" not in d and d["mean"] == pytest.approx(0.1)
    assert paired_difference({}, {0: 1.0})["n"] == 0


def test_plan_dedupes_a_baseline_under_an_llm_sweep(tmp_path):
    spec = read_study(
        RECIPE,
        arms=["baseline", "frozen", "shuffled"],
        seeds=2,
        sweep=["model.llm.layers=[-1],[-4]"],
        overrides=QUICK,
        out=tmp_path,
    )
    cells = plan_study(spec)
    assert len(cells) == 2 * 3 * 2
    runs = {c.run_dir for c in cells}
    assert len(runs) == 2 * 2 * 2 + 2  # the baseline runs once per seed, not once per layer
    base = [c for c in cells if c.arm == "baseline"]
    assert len({c.run_dir for c in base}) == 2
    frozen = [c for c in cells if c.arm == "frozen"]
    assert {c.point for c in frozen} == {"layers=[-1]", "layers=[-4]"}
    assert all(f"train.seed={c.seed}" in c.overrides for c in cells)


def test_study_file_names_recipes_arms_and_custom_arms(tmp_path):
    study = tmp_path / "s.yaml"
    study.write_text(
        yaml.safe_dump(
            {
                "study": {
                    "recipes": [str(RECIPE)],
                    "arms": ["baseline", "frozen_slow"],
                    "custom_arms": {"frozen_slow": ["model.llm.enabled=true", "train.lr=3e-4"]},
                    "seeds": [3, 4],
                    "overrides": QUICK,
                }
            }
        )
    )
    spec = read_study(study)
    assert spec.arms == {"baseline": ARMS["baseline"], "frozen_slow": ("model.llm.enabled=true", "train.lr=3e-4")}
    assert spec.seeds == [3, 4] and spec.reference == "baseline" and spec.recipes == [RECIPE]
    with pytest.raises(ConfigError, match="unknown arm"):
        read_study(study, arms=["nope"])
    with pytest.raises(ConfigError, match="reference arm"):
        read_study(study, reference="frozen")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"study": {"recipes": [str(RECIPE)], "arms": ["baseline"], "sede": 3}}))
    with pytest.raises(ConfigError, match="unknown study key"):
        read_study(bad)
    with pytest.raises(ConfigError, match="frozen / seed 0"):  # every config is validated before anything runs
        plan_study(read_study(RECIPE, arms=["frozen"], seeds=1, overrides=["model.llm.attention=nope"], out=tmp_path))


def test_arms_of_one_seed_share_every_init_outside_the_llm_stage():
    """The pairing the report relies on: baseline and LLM arms of one seed differ only in the LLM stage at init."""

    def encoder(llm_overrides):
        seed_everything(7)
        cfg = {
            "model": {
                "backbone": {"name": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 4, "depth": 1},
                "llm": {"enabled": llm_overrides is not None, "source": "smollm2-135m", **(llm_overrides or {})},
                "num_classes": 10,
            },
            "data": {"channels": 1},
        }
        return build_encoder(cfg, verbose=False).state_dict()

    base = encoder(None)
    for tune in ("frozen", "shuffled", "random", "scratch"):
        other = encoder({"tune": tune})
        for k, v in base.items():
            torch.testing.assert_close(other[k], v, msg=f"{tune}: {k}")


@pytest.mark.slow
def test_a_real_study_runs_resumes_and_reports(tmp_path, capsys):
    data = tmp_path / "data"
    args = ["study", str(RECIPE), *QUICK, f"data.root={data}", "--arms", "baseline,frozen", "--seeds", "2"]
    args += ["--jobs", "2", "--out", str(tmp_path / "study")]
    assert main(args) == 0
    out = tmp_path / "study"
    report = (out / "study.md").read_text()
    data_json = json.loads((out / "study.json").read_text())
    assert data_json["metric"] == "acc" and data_json["mode"] == "max"
    group = data_json["groups"][0]
    by_arm = {r["arm"]: r for r in group["arms"]}
    assert set(by_arm) == {"baseline", "frozen"} and all(r["n"] == 2 for r in by_arm.values())
    # the table's values are the runs' own test accuracies
    for arm in ("baseline", "frozen"):
        for seed in (0, 1):
            summary = json.loads(
                (out / "runs" / RECIPE.stem / "default" / arm / f"seed{seed}" / "summary.json").read_text()
            )
            assert by_arm[arm]["per_seed"][str(seed)] == pytest.approx(summary["test"]["acc"])
            assert summary["chance"] == {"loss": pytest.approx(math.log(10)), "acc": pytest.approx(0.1)}
            assert by_arm[arm]["left_chance"][str(seed)] in (True, False)  # two steps: a verdict either way
    assert "| left chance |" in report and "Left chance:" in report
    comp = group["comparisons"][0]
    diffs = [by_arm["frozen"]["per_seed"][str(s)] - by_arm["baseline"]["per_seed"][str(s)] for s in (0, 1)]
    assert comp["diffs"] == pytest.approx(diffs) and math.isfinite(comp["ci"][0])
    assert "frozen - baseline" in report and "95% CI" in report and "![learning curves]" in report
    assert (out / f"curves_{RECIPE.stem}_default.png").stat().st_size > 1000
    # a second call runs nothing and reports the same
    capsys.readouterr()
    assert main(args) == 0
    assert "0 to run" in capsys.readouterr().err
    assert (out / "study.md").read_text() == report
    # a killed run (no summary, a checkpoint) resumes; a changed command is refused, never silently reused
    run = out / "runs" / RECIPE.stem / "default" / "frozen" / "seed1"
    (run / "summary.json").unlink()
    assert (run / "checkpoints" / "latest").is_file()
    assert main([*args, "--dry-run"]) == 0
    assert "1 to run" in capsys.readouterr().err
    assert main(args) == 0
    assert (run / "summary.json").is_file()
    changed = ["study", str(RECIPE), *QUICK, "train.lr=0.5", f"data.root={data}", "--arms", "frozen", "--seeds", "1"]
    assert main([*changed, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "made with another config" in err and "train.lr: was 0.001, now 0.5" in err


def test_runs_go_seed_by_seed_so_a_stopped_grid_holds_whole_pairs(tmp_path, capsys):
    args = ["study", str(RECIPE), *QUICK, "--arms", "baseline,frozen,shuffled", "--seeds", "2"]
    assert main([*args, "--out", str(tmp_path), "--dry-run"]) == 0
    order = [
        (line.split("name=")[1].rsplit("-", 2)[1], line.split("train.seed=")[1].split()[0])
        for line in capsys.readouterr().out.splitlines()
    ]
    assert order == [
        ("baseline", "0"),
        ("frozen", "0"),
        ("shuffled", "0"),
        ("baseline", "1"),
        ("frozen", "1"),
        ("shuffled", "1"),
    ]


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "studies").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_study_files_plan(path, tmp_path):
    spec = read_study(path, out=tmp_path)
    cells = plan_study(spec)
    assert len(cells) == len(spec.recipes) * len(spec.arms) * len(spec.seeds) * max(
        1, math.prod(len(v) for v in spec.sweep.values())
    )


def test_recipes_with_one_stem_get_their_own_runs(tmp_path):
    for folder, lr in (("a", "1.0e-3"), ("b", "3.0e-4")):
        (tmp_path / folder).mkdir()
        text = RECIPE.read_text().replace("lr: 1.0e-3", f"lr: {lr}")
        (tmp_path / folder / "r.yaml").write_text(text)
    spec = read_study(tmp_path / "a" / "r.yaml", arms=["frozen"], seeds=1, overrides=QUICK, out=tmp_path / "s")
    spec.recipes = [tmp_path / "a" / "r.yaml", tmp_path / "b" / "r.yaml"]
    cells = plan_study(spec)
    assert len({c.run_dir for c in cells}) == 2 and {c.recipe for c in cells} == {"a-r", "b-r"}


def test_an_edited_recipe_is_not_reused(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.read_text())
    spec = read_study(recipe, arms=["frozen"], seeds=1, overrides=QUICK, out=tmp_path / "s")
    (cell,) = plan_study(spec)
    cell.run_dir.parent.mkdir(parents=True)
    (cell.run_dir.parent / f"{cell.run_dir.name}.command.json").write_text(
        json.dumps({"identity": cell.identity, "command": [], "config": cell.config})
    )
    assert _state(cell) == "fresh"
    recipe.write_text(RECIPE.read_text().replace("lr: 1.0e-3", "lr: 2.0e-3"))
    (edited,) = plan_study(spec)
    with pytest.raises(ConfigError, match=r"another config \(resolved config: train.lr: was 0.001, now 0.002\)"):
        _state(edited)
    # a marker from before configs were kept beside runs still refuses, and says what may have changed
    (cell.run_dir.parent / f"{cell.run_dir.name}.command.json").write_text(
        json.dumps({"identity": cell.identity, "command": _command(edited)})
    )
    with pytest.raises(ConfigError, match="recipe file or a default changed"):
        _state(edited)


def _finished_cell(tmp_path, losses, acc, samples=200, summary_extra=None):
    run = tmp_path / "run"
    run.mkdir(parents=True)
    lines = [json.dumps({"step": i + 1, "split": "train", "loss": v}) for i, v in enumerate(losses)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    summary = {
        "test": {"acc": acc, "samples": samples},
        **(summary_extra or {"chance": {"loss": math.log(10), "acc": 0.1}}),
    }
    return Cell("r", "default", "frozen", 0, [], run, RECIPE, status="done", summary=summary)


@pytest.mark.parametrize(
    "losses, acc, expected",
    [
        ([2.3] * 18 + [1.0, 1.2], 0.5, True),  # loss well below ln 10 = 2.30 at the end, accuracy far above 0.1
        ([2.3] * 20, 0.5, False),  # the loss never left ln C: a lucky test accuracy does not count
        ([2.3] * 18 + [1.0, 1.2], 0.14, False),  # 0.14 is within 3 standard errors of 0.1 on 200 samples (0.064)
        ([1.0] * 18 + [2.3, 2.3], 0.5, False),  # it left, then fell back onto the plateau
    ],
)
def test_left_chance_needs_both_a_low_loss_and_an_accuracy_beyond_noise(tmp_path, losses, acc, expected):
    assert left_chance(_finished_cell(tmp_path, losses, acc)) is expected


def test_left_chance_reads_summaries_written_before_the_chance_field(tmp_path):
    old = {"task": "ClassificationTask(num_classes=10, label_smoothing=0.0, top_k=5)"}
    assert left_chance(_finished_cell(tmp_path, [2.3] * 18 + [1.0, 1.2], 0.5, summary_extra=old)) is True
    assert left_chance(_finished_cell(tmp_path / "b", [1.0], 0.5, summary_extra={"task": "CTCTask()"})) is None


def test_equal_paired_differences_are_not_called_decisive():
    d = paired_difference({0: 0.6, 1: 0.7, 2: 0.8}, {0: 0.5, 1: 0.6, 2: 0.7})
    assert d["std"] == pytest.approx(0.0, abs=1e-12)
    text = _sentence("frozen", "baseline", d, "max", 100.0, " points", "r")
    assert "no spread" in text and "cannot decide" in text and "excludes zero" not in text
