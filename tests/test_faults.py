"""Fault injection: what a demanding user does to a run (kill it, break its shards, feed it odd tensors, train twice
into one folder) and the exact outcome each case must have. Nothing is lost without being counted, no two runs are
mixed, and every user mistake ends in one clear line.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import build_tiny_model
from safetensors.torch import load_file

from mmblocks.cli import main as cli_main
from mmblocks.config import ConfigError, load_config
from mmblocks.data import MissingKeyError, build_loader, make_dataset, read_index
from mmblocks.data.shards import ShardWriteError, write_shards
from mmblocks.errors import DataError
from mmblocks.llm import load_blocks
from mmblocks.llm.sources import SourceError
from mmblocks.recipes import build_trainer, evaluate_checkpoint, train
from mmblocks.train import latest_checkpoint
from mmblocks.train.checkpoint import CheckpointError, WeightsMismatchError, load_checkpoint
from mmblocks.train.run_folder import RunFolderError
from mmblocks.train.trainer import ResumeMismatchError
from tokenizers_mm import AudioPatches, ImagePatches, PointGroups, VideoTubelets, fbank

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/image/digits_vit_tiny.yaml"
TRAIN_SAMPLES = 1257  # digits: train / val / test = 1257 / 270 / 270


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    make_dataset("digits", root, seed=0, progress=False)
    return root


@pytest.fixture
def data(tmp_path, digits) -> Path:
    """A private copy of the digits shards, to break."""
    root = tmp_path / "data"
    shutil.copytree(digits, root)
    return root


def tiny(root: Path, out: Path, *extra: str) -> list[str]:
    """A 1-block ViT at 16 px: a digits epoch is 6 steps of <= 256 (two workers) in a few seconds on 2 CPU cores."""
    return [
        f"data.root={root}",
        f"train.out_dir={out}",
        "model.backbone.depth=1",
        "model.backbone.embed_dim=32",
        "model.backbone.num_heads=2",
        "model.backbone.patch_size=4",
        "data.batch_size=256",
        "data.num_workers=2",
        "train.epochs=1",
        "train.warmup_steps=1",
        "train.tensorboard=false",
        "train.progress=false",
        "train.log_every=1",
        *extra,
    ]


def rewrite_shard(root: Path, name: str, edit) -> None:
    """Rewrite shard `name` of `root` with ``edit(index, sample)`` applied to every sample (a dict of raw bytes) and
    update its size in ``index.json``, as a writer that knows nothing of mmblocks would leave it."""
    path = root / name
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    samples: dict[str, dict[str, bytes]] = {}
    for member, data in members:
        key, _, ext = member.partition(".")
        samples.setdefault(key, {"__key__": key})[ext] = data
    with wds.TarWriter(str(path)) as sink:
        for i, sample in enumerate(samples.values()):
            sink.write(edit(i, sample))
    _fix_index_size(root, name)


def _fix_index_size(root: Path, name: str) -> None:
    index = json.loads((root / "index.json").read_text())
    for split in index["splits"].values():
        for shard in split["shards"]:
            if shard["name"] == name:
                shard["bytes"] = (root / name).stat().st_size
    (root / "index.json").write_text(json.dumps(index))


def summary_of(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def records(out: Path, split: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


# ------------------------------------------------------------------------------------------- run folders


def test_a_second_run_into_a_folder_is_refused_and_overwrite_moves_the_first_aside(tmp_path, digits, capsys):
    out = tmp_path / "run"
    first = train(CONFIG, tiny(digits, out, "train.max_steps=2"))
    before = (out / "metrics.jsonl").read_text()

    assert cli_main(["train", CONFIG, *tiny(digits, out, "train.max_steps=1")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mmblocks: error: {out} already holds a run (checkpoints (step-00000002 latest)")
    assert "--resume" in err and "--overwrite" in err and "Traceback" not in err
    assert (out / "metrics.jsonl").read_text() == before, "the refused run wrote nothing"

    second = train(CONFIG, tiny(digits, out, "train.max_steps=1"), overwrite=True)
    [aside] = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert (aside / "metrics.jsonl").read_text() == before and summary_of(aside)["steps"] == first["steps"] == 2
    assert latest_checkpoint(aside / "checkpoints").name == "step-00000002"
    assert second["steps"] == 1 and [r["step"] for r in records(out, "train")] == [1]
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-00000001"]


def test_resume_with_nothing_to_resume_names_the_folder(tmp_path, digits, capsys):
    missing = tmp_path / "typo"
    assert cli_main(["train", CONFIG, *tiny(digits, missing), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"mmblocks: error: --resume: {missing} has no checkpoint to resume from (it does not exist)" in err
    assert not missing.exists()
    # a run killed before its first checkpoint: nothing to resume, and a new run must say --overwrite
    started = tmp_path / "early"
    started.mkdir()
    (started / "metrics.jsonl").write_text('{"step": 1, "split": "train", "time": 0, "loss": 2.3}\n')
    with pytest.raises(RunFolderError, match=r"it holds metrics\.jsonl\); start a new run without --resume and with"):
        build_trainer(CONFIG, tiny(digits, started), resume=True).fit()
    with pytest.raises(SystemExit):
        cli_main(["train", CONFIG, "--resume", "--overwrite"])
    assert "argument --overwrite: not allowed with argument --resume" in capsys.readouterr().err


def test_resume_refuses_a_changed_batch_size_naming_the_keys(tmp_path, digits):
    out = tmp_path / "run"
    train(CONFIG, tiny(digits, out, "train.max_steps=2", "train.checkpoint_every=1"))
    with pytest.raises(ResumeMismatchError) as info:
        build_trainer(CONFIG, tiny(digits, out, "train.max_steps=4", "data.batch_size=128"), resume=True).fit()
    message = str(info.value)
    assert "batch_size: checkpoint 256, now 128" in message and "steps_per_epoch: checkpoint 6, now 10" in message
    with pytest.raises(ResumeMismatchError, match=r"num_workers: checkpoint 2, now 1"):
        build_trainer(CONFIG, tiny(digits, out, "train.max_steps=4", "data.num_workers=1"), resume=True).fit()
    with pytest.raises(ResumeMismatchError, match=r"seed: checkpoint 0, now 5"):
        build_trainer(CONFIG, tiny(digits, out, "train.max_steps=4", "train.seed=5"), resume=True).fit()
    # more steps with the same data order is what resume is for
    resumed = build_trainer(CONFIG, tiny(digits, out, "train.max_steps=4"), resume=True).fit()
    assert resumed["steps"] == 4


# --------------------------------------------------------------------------------------- lost samples


def test_garbled_images_are_counted_and_an_epoch_stays_one_epoch(tmp_path, data):
    bad = set(random.Random(0).sample(range(500), 300))  # whatever the shard order, the epoch is short of batches

    def garble(i, sample):
        if i in bad:
            sample["png"] = sample["png"][:60] + bytes(range(256))  # the header survives, the data does not
        return sample

    rewrite_shard(data, "train-000000.tar", garble)
    out = tmp_path / "run"
    summary = train(CONFIG, tiny(data, out, "train.log_every=4"))
    assert summary["epochs"] == 1 and summary["steps"] < 6, "lost samples make the epoch shorter, not a second one"
    assert records(out, "train")[-1]["step"] == summary["steps"], "the epoch's last steps are logged too"
    assert len(records(out, "val")) == 1
    [entry] = [e for e in summary["data"]["epochs"] if e["split"] == "train"]
    assert (entry["expected"], entry["samples"], entry["lost"], entry["corrupt"]) == (1257, 957, 300, 300)
    assert entry["trained"] == 957 and entry["complete"]
    assert summary["data"]["totals"]["train"]["lost"] == 300
    [logged] = records(out, "data_train")
    assert logged["corrupt"] == 300 and logged["expected"] == 1257
    report = (out / "report" / "report.md").read_text()
    assert "## Data" in report and "| train | 0 | 1257 | 957 | 957 | 300 | 300 | 0 | 0 | 0 | 0 | True |" in report

    with pytest.raises(DataError, match=r"lost 300 of 1257 samples \(23\.9%: corrupt 300\), more than max_lost"):
        train(CONFIG, tiny(data, tmp_path / "strict", "data.max_lost_fraction=0.05"))


def test_a_corrupted_shard_counts_every_sample_the_index_says_it_held(tmp_path, data):
    shard = data / "train-000001.tar"
    raw = bytearray(shard.read_bytes())
    cut = len(raw) // 2
    raw[cut:] = b"\xff" * (len(raw) - cut)  # same size: the index still matches, the second half is garbage
    shard.write_bytes(bytes(raw))
    loader = build_loader(data, "train", batch_size=100, num_workers=2, image_size=16, channels=1, augment="none")
    keys = [k for b in loader for k in b.key]
    stats = loader.stats
    assert stats["shard_errors"] == 1 and stats["shard_lost"] == 500 - (len(keys) - 757)
    assert stats["samples"] + stats["lost"] == stats["expected"] == TRAIN_SAMPLES
    assert "read " in stats["reasons"][0] and "of the 500 samples index.json lists" in stats["reasons"][0]

    summary = train(CONFIG, tiny(data, tmp_path / "run"))
    [entry] = [e for e in summary["data"]["epochs"] if e["split"] == "train"]
    assert entry["shard_lost"] == stats["shard_lost"] > 200 and entry["shard_errors"] == 1


def test_a_truncated_shard_whose_index_no_longer_matches_is_refused(tmp_path, data):
    shard = data / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[: 700 * 1024])
    assert cli_main(["train", CONFIG, *tiny(data, tmp_path / "run")]) == 2


def test_samples_missing_a_key_are_counted_by_cause(tmp_path, data):
    def drop_label(i, sample):
        if i % 100 == 7:
            del sample["cls"]
        return sample

    rewrite_shard(data, "train-000002.tar", drop_label)  # 257 samples: 3 lose their label
    summary = train(CONFIG, tiny(data, tmp_path / "run"))
    [entry] = [e for e in summary["data"]["epochs"] if e["split"] == "train"]
    assert (entry["missing_key"], entry["lost"], entry["samples"]) == (3, 3, 1254)


def test_a_wrong_label_found_in_a_worker_is_one_clean_error(tmp_path, data):
    rewrite_shard(data, "train-000000.tar", lambda i, s: {**s, "cls": b"42"} if i == 3 else s)
    loader = build_loader(data, "train", batch_size=64, num_workers=2, image_size=16, channels=1)
    with pytest.raises(DataError) as info:
        list(loader)
    message = str(info.value)
    assert "label 42 of sample" in message and "outside 0..9" in message
    assert "Traceback" not in message and "worker" not in message


def test_a_deleted_index_is_an_error_and_never_remade_over_the_shards(tmp_path, data, capsys):
    (data / "index.json").unlink()
    mtimes = {p.name: p.stat().st_mtime_ns for p in data.glob("*.tar")}
    assert cli_main(["train", CONFIG, *tiny(data, tmp_path / "run")]) == 2  # the config names data.dataset: digits
    err = capsys.readouterr().err
    assert f"mmblocks: error: {data} holds 5 shard(s) (test-000000.tar, train-000000.tar, train-000001.tar, ...)" in err
    assert "no index.json" in err
    assert {p.name: p.stat().st_mtime_ns for p in data.glob("*.tar")} == mtimes and not (data / "index.json").exists()


# ---------------------------------------------------------------------------------------------- kill -9

_CHILD = """
import os, signal, sys
import mmblocks.train.checkpoint as ckpt
if os.environ.get("KILL_IN_SAVE"):  # SIGKILL this process inside the checkpoint write of the given step
    step, real = int(os.environ["KILL_IN_SAVE"]), ckpt.save_file
    def save_file(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        if metadata and metadata.get("step") == str(step):
            os.kill(os.getpid(), signal.SIGKILL)
    ckpt.save_file = save_file
from mmblocks.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _child(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, *args],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def test_kill_9_at_random_points_and_inside_a_checkpoint_write_resumes_bit_identically(tmp_path, digits):
    steps = ["train.epochs=2", "train.checkpoint_every=1", "data.augment=true", "model.backbone.drop_path_rate=0.1"]
    # the reference runs in a child too: the same thread count gives the same float reductions
    assert _child(["train", CONFIG, *tiny(digits, tmp_path / "ref", *steps)]).wait(timeout=300) == 0
    reference = summary_of(tmp_path / "ref")
    assert reference["steps"] == 12
    out = tmp_path / "run"
    rng = random.Random(0)
    kills = 0
    # 1) killed inside the write of checkpoint 3 (model.safetensors written, the rest not yet)
    proc = _child(["train", CONFIG, *tiny(digits, out, *steps)], {"KILL_IN_SAVE": "3"})
    assert proc.wait(timeout=300) == -signal.SIGKILL
    kills += 1
    assert latest_checkpoint(out / "checkpoints").name == "step-00000002", "a half-written checkpoint is never used"
    assert any(p.name.startswith(".tmp-step-00000003") for p in (out / "checkpoints").iterdir())
    # 2) resumed and killed twice more at a random moment after one or two new steps, then resumed to the end
    for _ in range(2):
        logged = len(records(out, "train"))
        proc = _child(["train", CONFIG, *tiny(digits, out, *steps), "--resume"])
        deadline = time.monotonic() + 300
        target = logged + rng.randint(1, 2)
        while len(records(out, "train")) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.2))  # mid-step, mid-checkpoint or between them
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    proc = _child(["train", CONFIG, *tiny(digits, out, *steps), "--resume"])
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
    assert kills == 3
    final = load_file(str(latest_checkpoint(out / "checkpoints") / "model.safetensors"))
    expected = load_file(str(latest_checkpoint(tmp_path / "ref" / "checkpoints") / "model.safetensors"))
    assert final.keys() == expected.keys()
    for name in expected:
        assert torch.equal(final[name], expected[name]), f"{name} differs after {kills} kills"
    assert summary_of(out)["data"] == reference["data"], "the data ledger survives the kills too"


# -------------------------------------------------------------------------------------- checkpoints


def test_eval_needs_only_the_weights_and_names_mismatched_tensors(tmp_path, digits, capsys):
    out = tmp_path / "run"
    train(CONFIG, tiny(digits, out, "train.max_steps=2"))
    alone = tmp_path / "weights" / "model.safetensors"
    alone.parent.mkdir()
    shutil.copy(latest_checkpoint(out / "checkpoints") / "model.safetensors", alone)
    results = evaluate_checkpoint(CONFIG, alone, tiny(digits, tmp_path / "unused"), splits=("test",))
    assert results["test"]["samples"] == 270 and results["test"]["lost"] == 0

    wider = tiny(digits, tmp_path / "unused", "model.backbone.embed_dim=64")
    assert cli_main(["eval", CONFIG, *wider, "--checkpoint", str(alone)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mmblocks: error: {alone}: ") and "has shape (32,), the model (64,)" in err
    classes = tiny(digits, tmp_path / "unused", "model.num_classes=7")
    with pytest.raises(WeightsMismatchError, match=r"head\.fc\.(weight|bias) has shape \(10,( 32)?\), the model \(7,"):
        evaluate_checkpoint(CONFIG, alone, classes, splits=("test",))
    # a changed model fails on the weights on resume too, not on the optimizer's parameter groups
    with pytest.raises(WeightsMismatchError, match="has shape"):
        build_trainer(CONFIG, tiny(digits, out, "model.backbone.embed_dim=64", "train.max_steps=3"), resume=True).fit()


def test_legacy_and_garbage_bin_files(tmp_path):
    model = build_tiny_model("llama")
    zipped, legacy = tmp_path / "zipped", tmp_path / "legacy"
    model.save_pretrained(zipped, safe_serialization=False)
    model.config.save_pretrained(legacy)
    torch.save(model.state_dict(), legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    x = torch.randn(2, 5, model.config.hidden_size)
    with torch.no_grad():
        assert torch.equal(load_blocks(str(legacy), [0])(x), load_blocks(str(zipped), [0])(x))
    (legacy / "pytorch_model.bin").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(SourceError, match=rf"refusing to load {legacy / 'pytorch_model.bin'}: .* not a torch file"):
        load_blocks(str(legacy), [0])


class _Payload:
    """Unpickling this runs ``open(MARKER, "w")``: it must never happen."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil(marker: Path) -> bytes:
    _Payload.marker = str(marker)
    return pickle.dumps({"state": {}, "param_groups": [], "x": _Payload()})


def test_a_malicious_pickle_in_any_file_the_package_loads_never_runs(tmp_path, digits):
    marker = tmp_path / "pwned"
    out = tmp_path / "run"
    train(CONFIG, tiny(digits, out, "train.max_steps=1"))
    step = latest_checkpoint(out / "checkpoints")
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        folder = tmp_path / f"evil-{name}"
        shutil.copytree(step, folder)
        (folder / name).write_bytes(_evil(marker))
        state = json.loads((folder / "state.json").read_text())
        state["files"][name] = (folder / name).stat().st_size
        (folder / "state.json").write_text(json.dumps(state))
        trainer = build_trainer(CONFIG, tiny(digits, tmp_path / "unused", "train.max_steps=1"))
        with pytest.raises(CheckpointError, match=rf"refusing to load {folder / name}: not a weights-only file"):
            load_checkpoint(folder, model=trainer.model, optimizer=trainer.optimizer, scheduler=trainer.scheduler)
        trainer.close()
    (step / "model.safetensors").write_bytes(_evil(marker))
    with pytest.raises(CheckpointError, match="corrupt safetensors"):
        evaluate_checkpoint(CONFIG, step, tiny(digits, tmp_path / "unused"), splits=("test",))
    # a model folder's pytorch_model.bin, in the zip format and in the legacy one
    model = build_tiny_model("llama")
    for legacy in (False, True):
        folder = tmp_path / f"bin-{legacy}"
        model.config.save_pretrained(folder)
        if legacy:
            (folder / "pytorch_model.bin").write_bytes(_evil(marker))
        else:
            torch.save({"w": _Payload()}, folder / "pytorch_model.bin")
        with pytest.raises(SourceError, match="not a weights-only file"):
            load_blocks(str(folder), [0])
    # a point cloud in a shard that is a pickled object array: lost as corrupt
    samples = [{"__key__": f"p{i}", "npy": _npy(np.random.rand(64, 3).astype(np.float32)), "cls": 0} for i in range(4)]
    samples[2]["npy"] = _npy(np.array([_Payload()], dtype=object))
    (tmp_path / "points").mkdir()
    with wds.TarWriter(str(tmp_path / "points" / "train-000000.tar")) as sink:
        for s in samples:
            sink.write(s)
    loader = build_loader(tmp_path / "points", batch_size=4, num_workers=0, modality="points", num_points=32)
    assert sum(len(b.key) for b in loader) == 3 and loader.stats["corrupt"] == 1
    # a config that asks YAML for a python object
    (tmp_path / "evil.yaml").write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "evil.yaml")
    assert not marker.exists()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ bad input


def test_tokenizers_take_any_float_dtype_and_refuse_what_they_cannot_use():
    torch.manual_seed(0)
    tok = ImagePatches(img_size=16, patch_size=4, in_chans=3, embed_dim=8).eval()
    x = torch.randn(2, 3, 16, 16)
    ref = tok(x).x
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        out = tok(x.to(dtype)).x
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, tok(x.to(dtype).float()).x)
    assert torch.equal(tok(x.double()).x, ref)
    with pytest.raises(TypeError, match=r"expects floating-point images \[B, C, H, W\], got torch.uint8: .*div\(255\)"):
        tok((x * 50).clamp(0, 255).to(torch.uint8))
    with pytest.raises(ValueError, match=r"image_patches got an empty batch \(shape \(0, 3, 16, 16\)\)"):
        tok(x[:0])
    nan = x.clone()
    nan[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"the input holds 1 NaN or infinite value\(s\) of 1536.*allow_nonfinite=True"):
        tok(nan)
    lenient = ImagePatches(img_size=16, patch_size=4, in_chans=3, embed_dim=8, allow_nonfinite=True)
    assert torch.isnan(lenient(nan).x[1]).any() and torch.isfinite(lenient(nan).x[0]).all()

    points = PointGroups(num_groups=4, group_size=8, embed_dim=8).eval()
    cloud = torch.rand(2, 64, 3)
    torch.testing.assert_close(points(cloud.double()).x, points(cloud).x)
    with pytest.raises(ValueError, match="points got an empty batch"):
        points(cloud[:0])

    video = VideoTubelets(img_size=16, num_frames=4, patch_size=8, embed_dim=8).eval()
    clip = torch.randn(1, 4, 3, 16, 16)
    torch.testing.assert_close(video(clip.half()).x, video(clip.half().float()).x)
    with pytest.raises(TypeError, match="normalize_frames"):
        video(clip.to(torch.uint8))


def test_fbank_names_the_layout_it_expects():
    stereo = torch.randn(16000, 2)
    with pytest.raises(ValueError, match=r"looks like 2-channel audio \[S, C\] \(channels last\): mix it down"):
        fbank(stereo)
    with pytest.raises(ValueError, match=r"fbank got an empty batch \(shape \(0, 16000\)\)"):
        fbank(torch.randn(0, 16000))
    with pytest.raises(TypeError, match=r"x.float\(\) / 32768"):
        fbank(torch.zeros(16000, dtype=torch.int16))
    torch.testing.assert_close(fbank(stereo.mean(-1)), fbank(stereo.mean(-1, keepdim=True).T))
    ast = AudioPatches(embed_dim=8, num_mel_bins=32, target_frames=32, fbank_kwargs={"num_mel_bins": 32})
    wave = torch.randn(1, 4000)
    wave[0, 100] = float("inf")
    with pytest.raises(ValueError, match=r"audio_patches: the input holds 1 NaN or infinite"):
        ast(wave)


def test_llm_blocks_refuse_an_empty_batch(tiny_checkpoint):
    blocks = load_blocks(str(tiny_checkpoint("llama")), [0])
    for shape in ((0, 4, blocks.hidden_size), (2, 0, blocks.hidden_size)):
        with pytest.raises(ValueError, match=r"LLMBlocks got an empty batch .* B >= 1 samples and N >= 1 tokens"):
            blocks(torch.zeros(shape))


def test_a_yaml_list_and_a_broken_pipe_and_the_version(tmp_path, capsys):
    (tmp_path / "list.yaml").write_text("- model\n- data\n")
    with pytest.raises(ConfigError, match=r"the top level must be a mapping of sections .* not a list"):
        load_config(tmp_path / "list.yaml")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmblocks", "blocks", "families"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # the reader is gone before anything is written (`| head -0`)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err, err
    with pytest.raises(SystemExit):
        cli_main(["--version"])
    assert capsys.readouterr().out.startswith("mmblocks 0.1")


def test_shards_write_and_make_refuse_to_replace_a_split_silently(tmp_path, digits):
    out = tmp_path / "copy"
    shutil.copytree(digits, out)
    rows = [{"__key__": f"n{i}", "png": _png(i), "cls": 1} for i in range(5)]
    with pytest.raises(ShardWriteError, match=r"already has a 'train' split \(1257 samples\): pass overwrite=True"):
        write_shards(rows, out, "train", class_names=[str(i) for i in range(10)], progress=False)
    assert read_index(out).splits["train"].num_samples == 1257
    with pytest.raises(ShardWriteError, match=r"already holds a dataset \(index.json: test 270, train 1257, val 270\)"):
        make_dataset("digits", out, progress=False)
    write_shards(rows, out, "train", class_names=[str(i) for i in range(10)], progress=False, overwrite=True)
    assert read_index(out).splits["train"].num_samples == 5


def _png(i: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), i * 20, np.uint8)).save(buf, format="png")
    return buf.getvalue()


def test_a_split_that_lacks_a_required_key_is_refused_before_any_worker_starts(tmp_path):
    write_shards(
        ({"__key__": f"k{i}", "png": _png(i), "cls": 0} for i in range(4)),
        tmp_path / "idx",
        "train",
        class_names=["a"],
        progress=False,
    )
    with pytest.raises(MissingKeyError) as info:
        build_loader(tmp_path / "idx", batch_size=2, num_workers=2, fields=("txt",), image_size=8)
    assert "Traceback" not in str(info.value) and "the task needs 'txt'" in str(info.value)


_KILLED_PARENT = """
import os, signal, sys, time
from mmblocks.data import build_loader
loader = build_loader(sys.argv[1], "train", batch_size=64, image_size=64, channels=1, num_workers=2,
                      prefetch_factor=8, shuffle=False)
it = iter(loader)
next(it)
time.sleep(2)  # the workers fill their queues (the pipe a killed parent leaves full)
def parent(pid):
    return open(f"/proc/{pid}/stat").read().split(") ")[1].split()[1]
kids = [p for p in os.listdir("/proc") if p.isdigit() and parent(p) == str(os.getpid())]
print(" ".join(kids), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_loader_workers_die_with_a_killed_training_process(digits, tmp_path):
    """A SIGKILLed (or OOM-killed) run must not leave its data workers behind: before the parent-death signal, the
    workers of such a run lived on forever, their exit waiting on a feeder thread blocked on a full pipe."""
    out, err = tmp_path / "pids", tmp_path / "stderr"  # files, not pipes: a surviving worker would hold a pipe open
    with open(out, "w") as fout, open(err, "w") as ferr:
        proc = subprocess.run(
            [sys.executable, "-c", _KILLED_PARENT, str(digits)],
            cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=fout,
            stderr=ferr,
            timeout=120,
        )
    assert proc.returncode == -signal.SIGKILL, err.read_text()[-2000:]
    workers = [int(p) for p in out.read_text().split()]
    assert len(workers) == 2
    deadline = time.time() + 15
    alive = workers
    while alive and time.time() < deadline:
        time.sleep(0.2)
        alive = [p for p in workers if os.path.exists(f"/proc/{p}") and _state(p) != "Z"]
    for pid in alive:  # leave nothing behind, then fail
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"workers {alive} outlived the killed training process"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].split()[0]
    except (FileNotFoundError, IndexError):
        return "X"
