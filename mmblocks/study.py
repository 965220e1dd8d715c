"""`mmblocks study`: a grid of arms x seeds (x an optional sweep) over one or more recipes, run resumably, side by
side, and reported with paired differences and their confidence intervals.

An *arm* is a named set of config overrides (`ARMS`: the baseline without an LLM stage, the frozen pretrained block,
its controls, trainable variants); a *sweep* point is one value per swept key; a *seed* sets ``train.seed``, which
fixes the data order and the initialisation of every part the arms share (`build_encoder` builds the LLM stage from
a stream of its own), so that the arms of one seed form a pair. Every run is an ordinary ``mmblocks train`` run in its
own folder; a finished run (its ``summary.json``, made with the same resolved config) is never run again, a killed
one resumes from its last checkpoint, and a folder made with another config is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, load_config
from .train.report import metric_series

__all__ = [
    "ARMS",
    "Cell",
    "StudySpec",
    "paired_difference",
    "parse_sweep",
    "plan_study",
    "read_study",
    "run_study",
    "write_study_report",
]

_LLM = ("model.llm.enabled=true",)
# Built-in arms: name -> overrides on the recipe. A study file may add its own (`arms:` as a mapping).
ARMS: dict[str, tuple[str, ...]] = {
    "baseline": ("model.llm.enabled=false",),
    "frozen": (*_LLM, "model.llm.tune=frozen"),
    "shuffled": (*_LLM, "model.llm.tune=shuffled"),
    "random_matched": (*_LLM, "model.llm.tune=random_matched"),
    "random": (*_LLM, "model.llm.tune=random"),
    "scratch": (*_LLM, "model.llm.tune=scratch"),
    "full": (*_LLM, "model.llm.tune=full"),
    "lora": (*_LLM, "model.llm.tune=lora"),
    "norm": (*_LLM, "model.llm.tune=norm"),
    "gated": (*_LLM, "model.llm.tune=gated"),
    "causal": (*_LLM, "model.llm.tune=frozen", "model.llm.attention=causal"),
    "rope": (*_LLM, "model.llm.tune=frozen", "model.llm.rope=native"),
}
_ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
# Config keys that mean nothing without an LLM stage: runs that differ only there are one run.
_LLM_ONLY = ("llm", "adapter_in", "adapter_out", "insert_at", "stage_residual")


@dataclasses.dataclass
class StudySpec:
    """What a study runs: recipes x sweep points x arms x seeds."""

    recipes: list[Path]
    arms: dict[str, tuple[str, ...]]
    seeds: list[int]
    reference: str
    sweep: dict[str, list[Any]] = dataclasses.field(default_factory=dict)
    overrides: list[str] = dataclasses.field(default_factory=list)
    metric: str | None = None
    jobs: int = 1
    out: Path = Path("runs/study")


@dataclasses.dataclass
class Cell:
    """One run of the grid (several cells may share one run folder when their configs are the same)."""

    recipe: str
    point: str
    arm: str
    seed: int
    overrides: list[str]
    run_dir: Path
    recipe_path: Path
    identity: str = ""  # hash of the resolved config: what makes two cells one run
    config: dict[str, Any] = dataclasses.field(default_factory=dict)  # that config, flattened to dotted keys
    status: str = "pending"  # pending, done, failed
    summary: dict[str, Any] | None = None


# ------------------------------------------------------------------------------------------------ spec
def _split_top_level(text: str) -> list[str]:
    """``[-1],[-4],[-8]`` -> ``["[-1]", "[-4]", "[-8]"]``: commas inside brackets or braces do not split."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [v.strip() for v in out if v.strip()]


def parse_sweep(items: Sequence[str]) -> dict[str, list[Any]]:
    """``["model.llm.layers=[-1],[-4]", "train.lr=1e-3,3e-4"]`` -> ``{key: [values parsed as YAML]}``."""
    sweep: dict[str, list[Any]] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value1,value2,... (e.g. model.llm.layers=[-1],[-4])")
        key, text = item.split("=", 1)
        values = [yaml.safe_load(v) for v in _split_top_level(text)]
        if not values:
            raise ConfigError(f"--set {item!r}: no values")
        sweep[key.strip()] = values
    return sweep


def _override(key: str, value: Any) -> str:
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


def _tag(point: Mapping[str, Any]) -> str:
    if not point:
        return "default"
    return " ".join(
        f"{k.rsplit('.', 1)[-1]}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in point.items()
    )


def _folder(tag: str) -> str:
    """A sweep point's label as a folder name."""
    return re.sub(r"[^A-Za-z0-9=.+_-]", "_", tag)


def _arms(names: Sequence[str] | Mapping[str, Sequence[str]] | None, custom: Mapping[str, Any]) -> dict[str, tuple]:
    table = {**ARMS, **{k: tuple(v) for k, v in custom.items()}}
    if isinstance(names, Mapping):
        table.update({k: tuple(v) for k, v in names.items()})
        names = list(names)
    names = list(names or ["baseline", "frozen", "shuffled", "random_matched", "random", "scratch"])
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ConfigError(f"unknown arm(s) {unknown}: built-in arms are {sorted(ARMS)}; define others under arms:")
    bad = [n for n in names if not _ARM_NAME.match(n)]
    if bad:
        raise ConfigError(f"arm names {bad} must be letters, digits and _ . + - (they name folders)")
    for name in names:
        if not all(isinstance(o, str) and "=" in o for o in table[name]):
            raise ConfigError(f"arm {name!r}: its overrides must be key=value strings, got {list(table[name])}")
    return {n: tuple(table[n]) for n in names}


def read_study(
    config: str | os.PathLike,
    *,
    arms: Sequence[str] | None = None,
    seeds: int | Sequence[int] | None = None,
    sweep: Sequence[str] = (),
    reference: str | None = None,
    overrides: Sequence[str] = (),
    metric: str | None = None,
    jobs: int | None = None,
    out: str | os.PathLike | None = None,
) -> StudySpec:
    """A `StudySpec` from a study file (a ``study:`` section) or a plain recipe, with the command line's choices
    taking precedence."""
    path = Path(config)
    if not path.is_file():
        raise ConfigError(f"study config {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if isinstance(raw, Mapping) and "study" in raw:
        study = dict(raw["study"] or {})
        unknown = sorted(
            set(study)
            - {"recipes", "arms", "seeds", "reference", "sweep", "overrides", "metric", "jobs", "out", "custom_arms"}
        )
        if unknown:
            raise ConfigError(f"{path}: unknown study key(s) {unknown}")
        recipes = [_find_recipe(r, path.parent) for r in study.get("recipes") or []]
        if not recipes:
            raise ConfigError(f"{path}: study.recipes must name at least one recipe")
        default_out = Path("runs") / "study" / path.stem
    else:
        study, recipes, default_out = {}, [path], Path("runs") / "study" / path.stem
    spec_arms = _arms(arms if arms else study.get("arms"), study.get("custom_arms") or {})
    seeds = seeds if seeds is not None else study.get("seeds", 3)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise ConfigError("a study needs at least one seed")
    ref = reference or study.get("reference") or ("baseline" if "baseline" in spec_arms else next(iter(spec_arms)))
    if ref not in spec_arms:
        raise ConfigError(f"reference arm {ref!r} is not one of the study's arms {list(spec_arms)}")
    sweep_map = {k: list(v) for k, v in (study.get("sweep") or {}).items()}
    sweep_map.update(parse_sweep(sweep))
    return StudySpec(
        recipes=recipes,
        arms=spec_arms,
        seeds=seed_list,
        reference=ref,
        sweep=sweep_map,
        overrides=[*(study.get("overrides") or []), *overrides],
        metric=metric or study.get("metric"),
        jobs=int(jobs or study.get("jobs") or 1),
        out=Path(out or study.get("out") or default_out),
    )


def _find_recipe(name: str, here: Path) -> Path:
    for candidate in (here / name, Path(name)):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"study recipe {name!r} not found (looked beside the study file, then from the current folder)")


# ------------------------------------------------------------------------------------------------ plan
def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _identity(recipe: Path, overrides: list[str]) -> tuple[str, dict[str, Any]]:
    """A hash of the run's resolved config, without where it is written, and that config flattened to dotted keys
    (kept beside the run, so a refusal can name what changed); the LLM-only parts of a run without an LLM stage do
    not count (a baseline under a sweep of ``model.llm.layers`` is one run)."""
    cfg = json.loads(json.dumps(load_config(recipe, overrides), default=str))
    cfg.pop("name", None)
    cfg.get("train", {}).pop("out_dir", None)
    if not cfg["model"]["llm"]["enabled"]:
        for key in _LLM_ONLY:
            cfg["model"].pop(key, None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16], _flatten(cfg)


def _config_diff(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key: was A, now B`` for every dotted key whose value differs (``absent`` where a side lacks it)."""
    missing = object()
    lines = []
    for key in sorted(set(before) | set(now)):
        was, asks = before.get(key, missing), now.get(key, missing)
        if was != asks:
            show = lambda v: "absent" if v is missing else repr(v)  # noqa: E731
            lines.append(f"{key}: was {show(was)}, now {show(asks)}")
    return lines


def _recipe_labels(recipes: Sequence[Path]) -> dict[Path, str]:
    """A name per recipe for folders and report sections: its stem, or ``<parent>-<stem>`` where stems repeat."""
    stems = [r.stem for r in recipes]
    labels = {r: r.stem if stems.count(r.stem) == 1 else f"{r.resolve().parent.name}-{r.stem}" for r in recipes}
    if len(set(labels.values())) < len(set(recipes)):
        raise ConfigError(f"study recipes {[str(r) for r in recipes]} cannot be told apart by name; rename one")
    return labels


def plan_study(spec: StudySpec) -> list[Cell]:
    """Every cell of the grid, with its run folder (``<out>/runs/<recipe>/<sweep point>/<arm>/seed<k>``); cells whose
    configs are the same share the first one's folder. Each config is validated here, before anything runs."""
    keys = list(spec.sweep)
    points = [dict(zip(keys, values)) for values in itertools.product(*(spec.sweep[k] for k in keys))] or [{}]
    labels = _recipe_labels(spec.recipes)
    folders = [_folder(_tag(p)) for p in points]
    clashes = sorted({f for f in folders if folders.count(f) > 1})
    if clashes:
        raise ConfigError(f"sweep points {clashes} would share a folder name; give the swept values distinct spellings")
    cells, seen = [], {}
    for recipe in spec.recipes:
        label = labels[recipe]
        for point in points:
            tag = _tag(point)
            for arm, arm_overrides in spec.arms.items():
                for seed in spec.seeds:
                    overrides = [
                        *spec.overrides,
                        *[_override(k, v) for k, v in point.items()],
                        *arm_overrides,
                        f"train.seed={seed}",
                    ]
                    try:
                        ident, flat = _identity(recipe, overrides)
                    except ConfigError as err:
                        raise ConfigError(f"study {recipe.stem} / {tag} / {arm} / seed {seed}: {err}") from err
                    run_dir = seen.setdefault(ident, spec.out / "runs" / label / _folder(tag) / arm / f"seed{seed}")
                    cells.append(Cell(label, tag, arm, seed, overrides, run_dir, recipe, ident, flat))
    return cells


# ------------------------------------------------------------------------------------------------ run
def _command(cell: Cell) -> list[str]:
    return [
        str(cell.recipe_path),
        *cell.overrides,
        f"train.out_dir={cell.run_dir}",
        f"name={cell.recipe}-{cell.arm}-seed{cell.seed}",
    ]


def _marker(cell: Cell) -> Path:
    """The command a run folder was made with, beside it (``--overwrite`` may move the folder's contents aside)."""
    return cell.run_dir.parent / f"{cell.run_dir.name}.command.json"


def _state(cell: Cell) -> str:
    """``done`` (a summary made with the same resolved config), ``resume`` (a checkpoint of it), ``fresh``; a run
    folder made with another config (another command, an edited recipe, changed defaults) is an error, never
    silently reused."""
    marker = _marker(cell)
    if marker.is_file():
        made = json.loads(marker.read_text())
        same = made["identity"] == cell.identity if "identity" in made else made.get("command") == _command(cell)
        if not same:
            before, now = made.get("command") or [], _command(cell)
            was, asks = [a for a in before if a not in now], [a for a in now if a not in before]
            keys = _config_diff(made["config"], cell.config) if "config" in made else []
            if keys:  # name what differs in the resolved configs: an override, an edited recipe or a changed default
                diff = f" (resolved config: {'; '.join(keys[:8])}{'; ...' if len(keys) > 8 else ''})"
            elif was or asks:
                diff = f" (it had {was}, the study now asks for {asks})"
            else:
                diff = " (the recipe file or a default changed)"
            raise ConfigError(
                f"{cell.run_dir} holds a run made with another config{diff}; use a new --out, or remove that folder "
                "to run it again"
            )
        if (cell.run_dir / "summary.json").is_file():
            return "done"
        if (cell.run_dir / "checkpoints" / "latest").is_file():
            return "resume"
    return "fresh"


def _run_one(cell: Cell, threads: int) -> Cell:
    state = _state(cell)
    if state != "done":
        cell.run_dir.parent.mkdir(parents=True, exist_ok=True)
        marker = {"identity": cell.identity, "command": _command(cell), "config": cell.config}
        _marker(cell).write_text(json.dumps(marker, indent=1))
        flag = "--resume" if state == "resume" else "--overwrite"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        log = cell.run_dir.parent / f"{cell.run_dir.name}.log"
        with open(log, "a") as fh:
            rc = subprocess.call(
                [sys.executable, "-m", "mmblocks", "train", *_command(cell), "train.progress=false", flag],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
            )
        if rc != 0 or not (cell.run_dir / "summary.json").is_file():
            cell.status = "failed"
            cell.summary = {"error": f"exit {rc}, see {log}"}
            return cell
    cell.status = "done"
    cell.summary = json.loads((cell.run_dir / "summary.json").read_text())
    return cell


def _make_datasets(cells: Sequence[Cell]) -> None:
    """Make each missing offline dataset the cells train on, once, in this process."""
    from .recipes import ensure_dataset
    from .train import init_distributed

    done: set[str] = set()
    for cell in cells:
        data = load_config(cell.recipe_path, cell.overrides)["data"]
        if str(data["root"]) not in done:
            done.add(str(data["root"]))
            ensure_dataset(data, init_distributed("cpu"))


def run_study(spec: StudySpec, *, dry_run: bool = False) -> dict[str, Any]:
    """Run every cell not yet done (`StudySpec.jobs` at a time, the cores shared among them), then write the report
    (`write_study_report`); returns the report's data. ``dry_run``: print the plan and run nothing."""
    from tqdm import tqdm

    cells = plan_study(spec)
    unique: dict[Path, Cell] = {}
    for cell in cells:
        unique.setdefault(cell.run_dir, cell)
    # Seed-major: every arm of seed 0 before any of seed 1, so a grid stopped early still holds whole pairs.
    order = sorted(unique.values(), key=lambda c: c.seed)
    todo = [c for c in order if _state(c) != "done"]
    print(
        f"study: {len(spec.recipes)} recipe(s) x {max(1, math.prod(len(v) for v in spec.sweep.values()))} sweep "
        f"point(s) x {len(spec.arms)} arm(s) x {len(spec.seeds)} seed(s) = {len(cells)} cells, {len(unique)} runs, "
        f"{len(todo)} to run, {spec.jobs} at a time -> {spec.out}",
        file=sys.stderr,
    )
    if dry_run:
        for cell in todo:
            print("mmblocks train " + " ".join(_command(cell)))
        return {"cells": len(cells), "runs": len(unique), "todo": len(todo)}
    _make_datasets(todo)  # before the pool: K processes must not all write one missing dataset
    threads = max(1, (os.cpu_count() or 1) // spec.jobs)
    with ThreadPoolExecutor(max_workers=spec.jobs) as pool:
        done = {c.run_dir: c for c in tqdm(pool.map(lambda c: _run_one(c, threads), order), total=len(unique))}
    for cell in cells:
        cell.status, cell.summary = done[cell.run_dir].status, done[cell.run_dir].summary
    return write_study_report(spec, cells)


# ------------------------------------------------------------------------------------------------ statistics
def _t_quantile(p: float, df: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(p, df))


def _sign_test(diffs: Sequence[float]) -> float:
    """Two-sided exact sign test of "positive and negative differences are equally likely" (ties dropped)."""
    pos = sum(d > 0 for d in diffs)
    n = sum(d != 0 for d in diffs)
    if n == 0:
        return 1.0
    k = min(pos, n - pos)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def paired_difference(arm: Mapping[int, float], reference: Mapping[int, float]) -> dict[str, Any]:
    """The difference ``arm - reference`` paired by seed: mean, std, the 95% t interval of the mean, the number of
    seeds, how many are positive, and the sign test's p-value. Seeds missing from either side are left out."""
    seeds = sorted(set(arm) & set(reference))
    diffs = [arm[s] - reference[s] for s in seeds]
    n = len(diffs)
    out: dict[str, Any] = {"n": n, "seeds": seeds, "diffs": diffs}
    if n == 0:
        return out
    mean = sum(diffs) / n
    out.update(mean=mean, positive=sum(d > 0 for d in diffs), negative=sum(d < 0 for d in diffs))
    out["sign_p"] = _sign_test(diffs)
    if n >= 2:
        std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
        half = _t_quantile(0.975, n - 1) * std / math.sqrt(n)
        out.update(std=std, ci=(mean - half, mean + half))
    return out


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


# ------------------------------------------------------------------------------------------------ report
def _metric_of(cells: Sequence[Cell], wanted: str | None) -> tuple[str, str]:
    """The metric to compare and whether higher is better: `wanted` or the runs' own monitor."""
    for cell in cells:
        if cell.status == "done" and cell.summary:
            monitor = cell.summary.get("monitor") or {"metric": "loss", "mode": "min"}
            name = wanted or monitor["metric"]
            mode = monitor["mode"] if name == monitor["metric"] else _mode_of(name)
            return name, mode
    return wanted or "loss", _mode_of(wanted or "loss")


def _mode_of(name: str) -> str:
    from .train.report import metric_mode

    return metric_mode(name) or "max"


def _value(cell: Cell, metric: str) -> float | None:
    if cell.status != "done" or not cell.summary:
        return None
    test = cell.summary.get("test") or {}
    value = test.get(metric)
    if value is None:  # no test split: the best validation value
        value = (cell.summary.get("best_val") or {}).get(f"val_{metric}")
    return float(value) if isinstance(value, int | float) else None


# A run has left chance when its training loss ends clearly below the chance loss and its test accuracy is above
# chance by more than sampling noise: the mean of the last tenth of its logged training losses at most
# CHANCE_LOSS_FRACTION x ln C, and test accuracy above 1/C by CHANCE_SIGMAS binomial standard errors.
CHANCE_LOSS_FRACTION = 0.8
CHANCE_SIGMAS = 3.0


def _chance_of(summary: Mapping[str, Any]) -> dict[str, float] | None:
    chance = summary.get("chance")
    if chance is None:  # summaries written before tasks reported their chance level
        found = re.search(r"ClassificationTask\(num_classes=(\d+)", str(summary.get("task", "")))
        chance = {"loss": math.log(int(found.group(1))), "acc": 1 / int(found.group(1))} if found else None
    return chance


def _series(cell: Cell) -> dict | None:
    """The metric series of a finished run's ``metrics.jsonl`` (`metric_series`), or None."""
    f = cell.run_dir / "metrics.jsonl"
    if cell.status != "done" or not f.is_file():
        return None
    return metric_series([json.loads(line) for line in f.read_text().splitlines() if line.strip()])


def left_chance(cell: Cell, series: dict | None = None) -> bool | None:
    """Whether a finished run left chance (see `CHANCE_LOSS_FRACTION`); None where its task has no chance level or
    the run logged no training loss. `series`: the run's `_series`, when the caller has read it already."""
    if cell.status != "done" or not cell.summary:
        return None
    chance, test = _chance_of(cell.summary), cell.summary.get("test") or {}
    series = series if series is not None else _series(cell)
    if not chance or "acc" not in test or series is None:
        return None
    losses = [v for _, v in series.get(("train", "loss"), [])]
    if not losses:
        return None
    tail = losses[-max(1, len(losses) // 10) :]
    p, n = chance["acc"], max(1, int(test.get("samples", 1)))
    low_loss = sum(tail) / len(tail) <= CHANCE_LOSS_FRACTION * chance["loss"]
    return low_loss and test["acc"] > p + CHANCE_SIGMAS * math.sqrt(p * (1 - p) / n)


def _fmt_scale(values: Sequence[float]) -> tuple[float, str]:
    """Values in [0, 1] are shown in points (x100), as papers do; others as they are."""
    return (100.0, " points") if values and all(0 <= v <= 1 for v in values) else (1.0, "")


def _sentence(arm: str, ref: str, d: Mapping[str, Any], mode: str, scale: float, unit: str, where: str) -> str:
    if d["n"] == 0:
        return f"{arm} vs {ref} ({where}): no seed finished in both arms."
    head = f"{arm} - {ref} ({where}): {d['mean'] * scale:+.2f}{unit}"
    if d["n"] < 2:
        return f"{head} on one seed: one seed has no interval, so it cannot decide."
    better = "higher" if mode == "max" else "lower"
    if d["std"] <= 1e-9 * max(1.0, abs(d["mean"])):  # equal differences (rounding aside)
        return (
            f"{head} in all {d['n']} paired seeds: no spread, so no t interval; the sign test gives p = "
            f"{d['sign_p']:.3g}, which with {d['n']} seeds cannot decide on its own."
            if d["sign_p"] > 0.05
            else f"{head} in all {d['n']} paired seeds (no spread; sign test p = {d['sign_p']:.3g})."
        )
    lo, hi = (v * scale for v in d["ci"])
    stats = (
        f" (95% CI {lo:+.2f} to {hi:+.2f}; {d['n']} paired seeds, {d['positive']} positive, {d['negative']} "
        f"negative; sign test p = {d['sign_p']:.3g})"
    )
    if lo > 0 or hi < 0:
        direction = "higher" if lo > 0 else "lower"
        verdict = "better" if direction == better else "worse"
        return f"{head}{stats}. The interval excludes zero: {arm} scores {direction} than {ref} ({verdict})."
    return f"{head}{stats}. The interval includes zero: these seeds cannot tell {arm} from {ref}."


def _curves(cells: Sequence[Cell], runs: Mapping[Path, dict | None], path: Path, metric: str) -> Path | None:
    """Training loss (EMA-smoothed) and the validation metric over steps, every seed of every arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {(c.arm, c.seed): runs[c.run_dir] for c in cells if runs.get(c.run_dir) is not None}
    if not series:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colours = {arm: f"C{i}" for i, arm in enumerate(dict.fromkeys(c.arm for c in cells))}
    for (arm, seed), s in series.items():
        label = arm if seed == min(sd for a, sd in series if a == arm) else None
        loss = s.get(("train", "loss"), [])
        if loss:
            steps, values = zip(*loss)
            smooth, acc = [], values[0]
            for v in values:
                acc = 0.8 * acc + 0.2 * v
                smooth.append(acc)
            axes[0].plot(steps, smooth, color=colours[arm], alpha=0.7, lw=1, label=label)
        val = s.get(("val", metric), [])
        if val:
            steps, values = zip(*val)
            axes[1].plot(steps, values, color=colours[arm], alpha=0.7, lw=1, marker=".", label=label)
    axes[0].set(title="train loss (EMA)", xlabel="step")
    axes[1].set(title=f"val {metric}", xlabel="step")
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_study_report(spec: StudySpec, cells: Sequence[Cell]) -> dict[str, Any]:
    """``<out>/study.md`` (per-arm mean ± std, paired differences against the reference with their intervals, sign
    tests and a sentence each, learning curves) and ``<out>/study.json``; returns the data."""
    groups: dict[tuple[str, str], list[Cell]] = {}
    for cell in cells:
        groups.setdefault((cell.recipe, cell.point), []).append(cell)
    lines = [
        f"# Study: {', '.join(r.stem for r in spec.recipes)}",
        "",
        "Arms are paired by seed (the same data order and the same initialisation of every shared part); differences "
        f"are arm - `{spec.reference}`, with a 95% t interval of the mean paired difference and an exact two-sided "
        "sign test (with 5 seeds or fewer its p-value cannot go below 0.0625).",
        "",
        f"Seeds: {spec.seeds}. Common overrides: {' '.join(spec.overrides) or 'none'}.",
    ]
    data: dict[str, Any] = {"reference": spec.reference, "groups": []}
    for (recipe, point), group in groups.items():
        metric, mode = _metric_of(group, spec.metric)
        data.setdefault("metric", metric)
        data.setdefault("mode", mode)
        values = {arm: {} for arm in spec.arms}
        for cell in group:
            v = _value(cell, metric)
            if v is not None:
                values[cell.arm][cell.seed] = v
        scale, unit = _fmt_scale([v for per in values.values() for v in per.values()])
        where = recipe if point == "default" else f"{recipe}, {point}"
        better = "higher" if mode == "max" else "lower"
        lines += ["", f"## {where}", "", f"Metric: test `{metric}` ({better} is better).", ""]
        left = {arm: {} for arm in spec.arms}
        runs = {cell.run_dir: _series(cell) for cell in group}  # each metrics.jsonl read once per report
        for cell in group:
            verdict = left_chance(cell, runs[cell.run_dir])
            if verdict is not None:
                left[cell.arm][cell.seed] = verdict
        with_chance = any(left.values())
        head, rule = f"| arm | seeds | test {metric} mean ± std | per seed |", "|---|---|---|---|"
        lines += [head + " left chance |", rule + "---|"] if with_chance else [head, rule]
        rows = []
        for arm, per in values.items():
            verdicts = left[arm]
            chance_txt = f" {sum(verdicts.values())} / {len(verdicts)} |" if with_chance else ""
            if per:
                m, s = _mean_std(list(per.values()))
                spread = f" ± {s * scale:.2f}" if s is not None else ""
                seeds_txt = ", ".join(f"{per[k] * scale:.2f}" for k in sorted(per))
                lines.append(f"| {arm} | {len(per)} | {m * scale:.2f}{spread} | {seeds_txt} |{chance_txt}")
                rows.append({"arm": arm, "n": len(per), "mean": m, "std": s, "per_seed": per, "left_chance": verdicts})
            else:
                lines.append(f"| {arm} | 0 | — | — |{' — |' if with_chance else ''}")
        if with_chance:
            stuck = [f"{arm} seed {seed}" for arm, per in left.items() for seed, ok in sorted(per.items()) if not ok]
            lines += [
                "",
                f"Left chance: the mean of the last tenth of the logged training losses is at most "
                f"{CHANCE_LOSS_FRACTION:g} ln C and test accuracy exceeds 1/C by {CHANCE_SIGMAS:g} binomial standard "
                "errors. " + (f"Runs that did not: {', '.join(stuck)}." if stuck else "Every finished run did."),
            ]
        failed = [c for c in group if c.status == "failed"]
        comparisons, sentences = [], []
        lines += ["", f"Paired differences against `{spec.reference}`:", ""]
        lines += [
            "| arm - reference | seeds | mean | 95% CI | positive / negative | sign test p |",
            "|---|---|---|---|---|---|",
        ]
        for arm in spec.arms:
            if arm == spec.reference:
                continue
            d = paired_difference(values[arm], values[spec.reference])
            comparisons.append({"arm": arm, **d})
            if d["n"]:
                ci = f"{d['ci'][0] * scale:+.2f} to {d['ci'][1] * scale:+.2f}" if "ci" in d else "—"
                lines.append(
                    f"| {arm} - {spec.reference} | {d['n']} | {d['mean'] * scale:+.2f} | {ci} | "
                    f"{d['positive']} / {d['negative']} | {d['sign_p']:.3g} |"
                )
            sentences.append(_sentence(arm, spec.reference, d, mode, scale, unit, where))
        lines += [""] + [f"- {s}" for s in sentences]
        if failed:
            lines += ["", "Failed runs: " + "; ".join(f"{c.arm} seed {c.seed} ({c.summary['error']})" for c in failed)]
        png = _curves(group, runs, spec.out / f"curves_{recipe}_{_folder(point)}.png", metric)
        if png is not None:
            lines += ["", f"![learning curves]({png.name})"]
        data["groups"].append(
            {
                "recipe": recipe,
                "point": point,
                "metric": metric,
                "mode": mode,
                "arms": rows,
                "comparisons": comparisons,
                "sentences": sentences,
                "failed": [{"arm": c.arm, "seed": c.seed, "error": c.summary["error"]} for c in failed],
            }
        )
    spec.out.mkdir(parents=True, exist_ok=True)
    (spec.out / "study.md").write_text("\n".join(lines) + "\n")
    (spec.out / "study.json").write_text(json.dumps(data, indent=1, default=str))
    print("\n".join(lines))
    return data
