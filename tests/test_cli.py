"""The command line: user-facing errors (`mmblocks.errors.USER_ERRORS`) print one line and exit 2; a programming error
keeps its traceback."""

from __future__ import annotations

import pytest

import mmblocks.recipes
from mmblocks.cli import main
from mmblocks.errors import USER_ERRORS, DataError, MissingShardsError, MMBlocksError


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(tmp_path, capsys, monkeypatch):
    argv = ["train", "configs/image/digits_vit_tiny.yaml", f"data.root={tmp_path / 'none'}", "data.dataset=null"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmblocks: error: no shards at") and err.count("\n") == 1
    assert main(["train", "configs/image/digits_vit_tiny.yaml", "model.backbone.name=vit_tiny_patch16"]) == 2
    assert "model.backbone.name: unknown backbone 'vit_tiny_patch16'" in capsys.readouterr().err

    def bug(*args, **kwargs):
        raise KeyError("an internal bug")

    monkeypatch.setattr(mmblocks.recipes, "train", bug)
    with pytest.raises(KeyError, match="an internal bug"):
        main(["train", "configs/image/digits_vit_tiny.yaml"])


def test_the_error_classes_are_user_errors():
    from mmblocks.config import ConfigError
    from mmblocks.data import MissingKeyError, ShardIndexError, ShardWriteError
    from mmblocks.data.video_io import VideoDecodeError
    from mmblocks.llm import SourceError, UnknownFamilyError
    from mmblocks.train.checkpoint import CheckpointError

    for cls in (ConfigError, DataError, MissingKeyError, ShardIndexError, ShardWriteError, VideoDecodeError,
                SourceError, UnknownFamilyError, CheckpointError):  # fmt: skip
        assert issubclass(cls, MMBlocksError) and issubclass(cls, USER_ERRORS), cls
    assert issubclass(ConfigError, ValueError) and issubclass(DataError, RuntimeError)
    assert issubclass(MissingShardsError, DataError) and issubclass(MissingShardsError, FileNotFoundError)


def test_what_the_loader_rejects_is_a_config_error(tmp_path, capsys):
    from mmblocks.data import make_dataset

    make_dataset("digits", tmp_path, progress=False)
    argv = ["train", "configs/image/digits_vit_tiny.yaml", f"data.root={tmp_path}", "data.image_size=null"]
    assert main([*argv, f"train.out_dir={tmp_path / 'run'}"]) == 2
    assert "mmblocks: error: data: image shards need image_size" in capsys.readouterr().err
