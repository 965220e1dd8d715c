"""The floors: which package may import which (CONTRIBUTING.md), checked on the source with `ast`.

Every import counts, including ones deferred into a function body ("import late" is how a cycle hides) and ones under
``TYPE_CHECKING``. A module may import from a lower floor or from its own package; packages on the same floor are
independent of each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: Lowest first. Each entry is one floor: the packages (or modules) on it.
FLOORS: list[tuple[str, ...]] = [
    ("tokenizers_mm",),
    ("adapters",),
    ("mmblocks.errors", "mmblocks.params", "mmblocks.safe_load"),
    ("mmblocks.layers", "mmblocks.eval"),
    ("mmblocks.llm", "mmblocks.heads", "mmblocks.data"),
    ("mmblocks.models", "mmblocks.tasks", "mmblocks.analysis"),
    ("mmblocks.train",),
    ("mmblocks.config",),
    ("mmblocks.builders",),
    ("mmblocks.recipes", "mmblocks.reference"),
    ("mmblocks.study", "mmblocks.inspect_runs", "mmblocks.zeroshot_report"),
    ("mmblocks.demo",),
    ("mmblocks.cli",),
    ("mmblocks.__main__", "mmblocks"),
]
UNITS = {unit: level for level, units in enumerate(FLOORS) for unit in units}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _unit(module: str) -> str | None:
    """The floor entry `module` belongs to (the longest matching prefix; ``mmblocks`` only for the package itself)."""
    best = None
    for unit in UNITS:
        inside = (module == unit or module.startswith(unit + ".")) and unit != "mmblocks"
        if inside and (best is None or len(unit) > len(best)):
            best = unit
    if best is None and module == "mmblocks":
        return "mmblocks"
    return best


def _is_module(name: str) -> bool:
    path = REPO.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, absolute module)`` of every import in the file, relative ones resolved."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((node.lineno, target))
            # `from mmblocks import config` imports the module mmblocks.config
            out += [(node.lineno, f"{target}.{a.name}") for a in node.names if _is_module(f"{target}.{a.name}")]
    return [(line, name) for line, name in out if name.split(".")[0] in ("mmblocks", "adapters", "tokenizers_mm")]


SOURCES = sorted(p for pkg in ("tokenizers_mm", "adapters", "mmblocks") for p in (REPO / pkg).rglob("*.py"))


def test_every_module_has_a_floor():
    assert SOURCES and all(_unit(_module_name(p)) for p in SOURCES), [p for p in SOURCES if not _unit(_module_name(p))]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_imports_go_down_the_floors(path):
    importer = _unit(_module_name(path))
    bad = []
    for line, name in _imports(path):
        target = _unit(name)
        if target is None or target == importer or name == _module_name(path):
            continue
        if UNITS[target] >= UNITS[importer]:
            bad.append(f"line {line}: {name} (floor {UNITS[target]}) from {importer} (floor {UNITS[importer]})")
    assert not bad, f"{path.relative_to(REPO)} imports against the floors: {bad}"


@pytest.mark.parametrize(
    ("packages", "forbidden"),
    [
        (("tokenizers_mm", "adapters"), ("mmblocks",)),
        (
            ("mmblocks/llm", "mmblocks/layers", "mmblocks/train"),
            ("mmblocks.models", "mmblocks.builders", "mmblocks.config", "mmblocks.cli", "mmblocks.recipes"),
        ),
        (("mmblocks/data",), ("mmblocks.models", "mmblocks.llm", "mmblocks.train", "mmblocks.config")),
    ],
)
def test_named_rules(packages, forbidden):
    """The issue's rules spelled out: the lower packages never reach the config-driven ones."""
    for pkg in packages:
        for path in (REPO / pkg).rglob("*.py"):
            for line, name in _imports(path):
                hit = [f for f in forbidden if name == f or name.startswith(f + ".")]
                assert not hit, f"{path.relative_to(REPO)}:{line} imports {name}"


def test_the_checker_sees_deferred_and_relative_imports(tmp_path):
    """A mutation check of the checker itself: an upward import inside a function of mmblocks/llm is found."""
    fake = REPO / "mmblocks" / "llm" / "_floors_probe.py"
    fake.write_text("def f():\n    from ..builders import build_encoder\n    from ..models import MMEncoder\n")
    try:
        found = [name for _, name in _imports(fake)]
        assert "mmblocks.builders" in found and "mmblocks.models" in found
        with pytest.raises(AssertionError, match="imports against the floors"):
            test_imports_go_down_the_floors(fake)
    finally:
        fake.unlink()
