"""The README's generated reference (registries, `load_blocks`, config keys) is what the code says today."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mmblocks.reference import BEGIN, END, reference_markdown

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def test_the_readme_reference_matches_the_code():
    # a fresh process: other tests register extra components (test_extension's head) in this one
    out = subprocess.run(
        [sys.executable, "-m", "mmblocks", "reference"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    ).stdout
    generated = README.read_text().split(BEGIN, 1)[1].split(END, 1)[0]
    assert generated == "\n" + out, "README.md is stale: run `make docs`"


def test_the_reference_names_every_registry_entry_and_config_key():
    from adapters import list_adapters
    from mmblocks.config.schema import schema
    from mmblocks.models import list_backbones

    ref = reference_markdown()
    assert all(f"`{name}`" in ref for name in [*list_adapters(), *list_backbones()])
    assert "`data.max_lost_fraction`" in ref and "`train.accum_steps`" in ref and "`name`" in ref
    assert len(schema()["train"]) == sum(line.startswith("| `train.") for line in ref.splitlines())
