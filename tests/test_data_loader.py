"""`build_loader`: exactly-once epochs over ranks x workers, determinism, resampling, corrupt data, key errors."""

from __future__ import annotations

import io
import itertools
import json
import logging
import random
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from data_helpers import all_keys, png_bytes, tiny_samples, write_tiny
from PIL import Image
from torchvision.transforms import v2

from mmblocks.data import (
    Batch,
    MissingKeyError,
    ShardIndexError,
    build_loader,
    build_transform,
    resolve_shards,
    write_shards,
)
from mmblocks.data.loader import plan_slot, shard_order, slot_sizes
from mmblocks.data.transforms import ToNormalizedTensor

LOAD = dict(batch_size=4, image_size=8, augment="none")


def _rank_keys(root, world_size: int = 2, num_workers: int = 2, **kw) -> list[list[str]]:
    """The keys each rank sees in one epoch, in order."""
    return [
        all_keys(build_loader(root, rank=r, world_size=world_size, num_workers=num_workers, **{**LOAD, **kw}))
        for r in range(world_size)
    ]


def _assert_exactly_once(per_rank: list[list[str]], expected: list[str]) -> None:
    counts = Counter(k for keys in per_rank for k in keys)
    assert sorted(counts) == sorted(expected)
    assert set(counts.values()) == {1}, {k: c for k, c in counts.items() if c != 1}


# ------------------------------------------------------------------------------------------------ exactly once


@pytest.mark.parametrize(
    ("num_shards", "partition"),
    [(8, "auto"), (7, "auto"), (3, "auto"), (8, "shards"), (7, "shards"), (3, "shards")],
    ids=["8-range", "7-range", "3-range", "8-shards", "7-shards", "3-shards"],
)
def test_two_ranks_two_workers_see_each_sample_once(tmp_path, num_shards, partition):
    n = 45
    write_tiny(tmp_path, n, num_shards)
    expected = [f"train-{i:04d}" for i in range(n)]
    epoch0 = _rank_keys(tmp_path, partition=partition)
    _assert_exactly_once(epoch0, expected)
    if partition == "auto":  # range partition: balanced to one sample per slot
        assert sorted(len(k) for k in epoch0) == [22, 23]
    epoch1 = _rank_keys(tmp_path, partition=partition, epoch=1)
    _assert_exactly_once(epoch1, expected)
    assert epoch1 != epoch0  # a new epoch reshuffles
    assert _rank_keys(tmp_path, partition=partition) == epoch0  # same seed and epoch: same order


def test_set_epoch_and_len_match_what_is_delivered(tmp_path):
    write_tiny(tmp_path, 45, 7)
    loader = build_loader(tmp_path, rank=1, world_size=2, num_workers=2, **LOAD)
    orders = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(loader)  # per worker: ceil(slot samples / batch size)
        orders.append([k for b in batches for k in b.key])
        assert loader.stats["complete"] and loader.stats["samples"] == len(orders[-1])
    assert len({tuple(o) for o in orders}) == 3, "set_epoch reseeds the order"
    other = build_loader(tmp_path, rank=0, world_size=2, num_workers=2, **LOAD)
    for epoch, mine in enumerate(orders):
        other.set_epoch(epoch)
        theirs = [k for b in other for k in b.key]
        assert sorted(mine + theirs) == [f"train-{i:04d}" for i in range(45)], "each epoch: every sample once"
    loader.set_epoch(1)
    assert [k for b in loader for k in b.key] == orders[1], "an epoch replays exactly"
    for world, workers, drop_last in ((1, 0, False), (2, 2, True), (3, 2, False)):
        for partition in ("auto", "shards"):
            for rank in range(world):
                loader = build_loader(
                    tmp_path,
                    rank=rank,
                    world_size=world,
                    num_workers=workers,
                    drop_last=drop_last,
                    partition=partition,
                    **LOAD,
                )
                batches = list(loader)
                assert len(batches) == len(loader)
                assert all(len(b.key) == 4 for b in batches) or not drop_last
    assert loader.num_samples == 45 and loader.class_names == ["c0", "c1", "c2"] and loader.num_classes == 3


def test_persistent_workers_early_stop_and_fresh_workers_agree(tmp_path):
    write_tiny(tmp_path, 45, 7)
    expected = [f"train-{i:04d}" for i in range(45)]
    persistent = build_loader(tmp_path, num_workers=2, **LOAD)
    fresh = build_loader(tmp_path, num_workers=2, persistent_workers=False, **LOAD)
    for epoch in range(3):
        persistent.set_epoch(epoch)
        fresh.set_epoch(epoch)
        if epoch == 1:  # stop early: the next epoch must still be complete and exact
            next(iter(persistent))
            assert not persistent.stats["complete"]
            persistent.set_epoch(epoch)
        keys = all_keys(persistent)
        assert keys == all_keys(fresh)
        _assert_exactly_once([keys], expected)
    persistent.close()


def test_loader_output_equals_the_per_image_transform(tmp_path):
    write_tiny(tmp_path, 12, 2, samples=tiny_samples(12, prefix="train-", size=11))
    for channels in (3, 1):
        loader = build_loader(
            tmp_path,
            "train",
            batch_size=5,
            image_size=6,
            num_workers=0,
            augment="none",
            channels=channels,
            shuffle=False,
        )
        transform = build_transform(6, train=False, channels=channels)
        for batch in loader:
            for image, key in zip(batch.image, batch.key):
                pil = Image.open(io.BytesIO(png_bytes(int(key[-4:]), 11))).convert("RGB" if channels == 3 else "L")
                torch.testing.assert_close(image, transform(pil), atol=1e-5, rtol=0)


@pytest.mark.parametrize("partition", ["range", "shards"])
def test_plan_covers_every_sample_once(partition):
    """The partition schemes themselves, over many shard counts, sizes and slot counts (no I/O)."""
    rng = random.Random(0)
    for _ in range(300):
        counts = [rng.randint(0, 9) for _ in range(rng.randint(1, 9))]
        num_slots = rng.randint(1, 7)
        order = shard_order(len(counts), seed=rng.randint(0, 99), epoch=rng.randint(0, 9), shuffle=True)
        seen: Counter = Counter()
        per_slot = []
        for slot in range(num_slots):
            running, mine = 0, 0
            for task in plan_slot(counts, order, slot, num_slots, partition):
                for i in range(counts[task.shard]):
                    if task.interleave:
                        running += 1
                        keep = (running - 1) % num_slots == slot
                    else:
                        keep = task.start <= i < (counts[task.shard] if task.stop is None else task.stop)
                    if keep:
                        seen[(task.shard, i)] += 1
                        mine += 1
            per_slot.append(mine)
        assert sorted(seen) == [(s, i) for s in range(len(counts)) for i in range(counts[s])]
        assert set(seen.values()) <= {1}
        assert per_slot == slot_sizes(counts, order, num_slots, partition)
        if partition == "range":
            assert max(per_slot) - min(per_slot) <= 1


# ----------------------------------------------------------------------------------------- foreign shard sets


def test_reads_shards_written_by_webdataset_shardwriter(tmp_path):
    with wds.ShardWriter(str(tmp_path / "shard-%06d.tar"), maxcount=4, verbose=0) as sink:
        for i in range(18):
            sink.write({"__key__": f"w{i:03d}", "png": png_bytes(i), "cls": i % 2})
    expected = [f"w{i:03d}" for i in range(18)]
    # a folder without index.json, a brace pattern, and a list: no counts, so the shard/interleave partition
    _assert_exactly_once(_rank_keys(tmp_path), expected)
    pattern = str(tmp_path / "shard-{000000..000004}.tar")
    _assert_exactly_once(_rank_keys(pattern, world_size=1, num_workers=2), expected)
    urls = sorted(str(p) for p in tmp_path.glob("*.tar"))
    loader = build_loader(urls, num_workers=0, shuffle=False, **LOAD)
    batch = next(iter(loader))
    assert batch.key == expected[:4] and batch.label.tolist() == [0, 1, 0, 1]
    assert loader.num_samples is None and loader.class_names is None
    with pytest.raises(TypeError, match="needs per-shard sample counts"):
        len(loader)
    with pytest.raises(ValueError, match="partition='range' needs"):
        build_loader(urls, partition="range", **LOAD)


def test_shard_lists_beside_an_index_get_counts(tmp_path):
    write_tiny(tmp_path, 20, 4)
    source = resolve_shards(str(tmp_path / "train-{000000..000003}.tar"))
    assert source.counts == [5, 5, 5, 5] and source.class_names == ["c0", "c1", "c2"]
    assert resolve_shards(tmp_path / "index.json").counts == [5, 5, 5, 5]
    assert resolve_shards(tmp_path / "train-000002.tar").urls == [str(tmp_path / "train-000002.tar")]


def test_index_mismatch_missing_shard_and_split_are_errors(tmp_path):
    write_tiny(tmp_path, 12, 3)
    with pytest.raises(ShardIndexError, match=r"split 'val' is not in the index \(splits: train\)"):
        build_loader(tmp_path, "val", **LOAD)
    with open(tmp_path / "train-000001.tar", "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(ShardIndexError, match=r"train-000001\.tar has .* bytes but .*index\.json says"):
        build_loader(tmp_path, **LOAD)
    (tmp_path / "train-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match=r"train-000001\.tar not found"):
        build_loader(tmp_path, **LOAD)


# --------------------------------------------------------------------------------------------------- bad data


def test_corrupt_samples_are_skipped_and_counted_across_workers(tmp_path, caplog):
    samples = tiny_samples(24, prefix="train-")
    bad = {3: b"not an image at all", 10: png_bytes(10)[:40], 17: b"\x89PNG\r\n\x1a\n" + b"\0" * 30}
    for i, data in bad.items():
        samples[i]["png"] = data
    write_tiny(tmp_path, 24, 4, samples=samples)
    caplog.set_level(logging.WARNING, logger="mmblocks.data")
    loader = build_loader(tmp_path, num_workers=2, **LOAD)
    keys = all_keys(loader)
    skipped = {f"train-{i:04d}" for i in bad}
    assert sorted(keys) == sorted(s["__key__"] for s in samples if s["__key__"] not in skipped)
    stats = loader.stats
    counts = tuple(stats[k] for k in ("samples", "lost", "corrupt", "shard_errors", "expected", "complete"))
    assert counts == (21, 3, 3, 0, 24, True)
    assert len(stats["reasons"]) == 3 and all(" in " in r for r in stats["reasons"])
    assert loader.global_stats()["lost"] == 3  # no process group: this rank's counts
    assert "lost 3 sample(s) (corrupt 3, missing_key 0, shard_lost 0)" in caplog.text
    assert "delivered 21 of 24" in caplog.text
    # counts are per epoch, and per rank: two ranks' counts add up
    loader.set_epoch(1)
    all_keys(loader)
    assert loader.stats["corrupt"] == 3 and loader.stats["epoch"] == 1
    ranks = [build_loader(tmp_path, rank=r, world_size=2, num_workers=2, **LOAD) for r in (0, 1)]
    assert sum(len(all_keys(r)) for r in ranks) == 21 and sum(r.stats["corrupt"] for r in ranks) == 3
    assert [r.stats["samples"] + r.stats["lost"] for r in ranks] == [r.stats["expected"] for r in ranks] == [12, 12]


def _member_offsets(path: Path) -> dict[str, tuple[int, int]]:
    with tarfile.open(path) as tar:
        return {m.name: (m.offset, m.offset_data) for m in tar.getmembers()}


def test_broken_tar_and_bad_label_count_as_errors(tmp_path):
    # no index: a shard cut inside a member, and a label that is not a number (written with webdataset directly)
    with wds.ShardWriter(str(tmp_path / "train-%06d.tar"), maxcount=8, verbose=0) as sink:
        for i in range(16):
            sink.write({"__key__": f"k{i:02d}", "png": png_bytes(i), "cls": b"seven" if i == 2 else i % 3})
    shard = tmp_path / "train-000001.tar"
    cut = _member_offsets(shard)["k13.png"][1] + 10
    shard.write_bytes(shard.read_bytes()[:cut])
    loader = build_loader(tmp_path, num_workers=2, **LOAD)
    keys = all_keys(loader)
    assert sorted(keys) == [f"k{i:02d}" for i in (0, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12)]  # k13 is incomplete
    stats = loader.stats
    # no index: the sample in progress when the shard broke is the one known loss (k14, k15 are never seen)
    assert (stats["shard_errors"], stats["shard_lost"], stats["corrupt"], stats["samples"]) == (1, 1, 1, 12)
    assert stats["expected"] is None
    assert any("seven" in r for r in stats["reasons"]) and any("train-000001.tar" in r for r in stats["reasons"])

    # a garbled header (same file size, so the index still matches): Python's tarfile would stop silently here
    write_tiny(tmp_path / "idx", 16, 2)
    shard = tmp_path / "idx" / "train-000000.tar"
    header = _member_offsets(shard)["train-0005.cls"][0]
    data = bytearray(shard.read_bytes())
    data[header : header + 512] = b"\xff" * 512
    shard.write_bytes(bytes(data))
    loader = build_loader(tmp_path / "idx", num_workers=2, **LOAD)
    keys = all_keys(loader)
    # train-0004 (in progress when the error came) .. train-0007 are lost: the index says the shard held 8
    assert sorted(keys) == [f"train-{i:04d}" for i in (0, 1, 2, 3, *range(8, 16))]
    assert (loader.stats["shard_errors"], loader.stats["shard_lost"], loader.stats["lost"]) == (1, 4, 4)
    assert loader.stats["samples"] + loader.stats["lost"] == loader.stats["expected"] == 16
    [reason] = loader.stats["reasons"]
    assert "bad header checksum" in reason and "read 4 of the 8 samples" in reason

    # a shard with fewer samples than index.json says
    write_tiny(tmp_path / "short", 16, 2)
    index = json.loads((tmp_path / "short" / "index.json").read_text())
    index["splits"]["train"]["shards"][1]["count"] = 9
    (tmp_path / "short" / "index.json").write_text(json.dumps(index))
    loader = build_loader(tmp_path / "short", num_workers=2, **LOAD)
    assert len(all_keys(loader)) == 16 and loader.stats["shard_errors"] == 1 and loader.stats["shard_lost"] == 1
    assert "train-000001.tar: ended after 8 of the 9 samples" in loader.stats["reasons"][0]


def test_a_sample_missing_its_label_is_lost_and_counted(tmp_path):
    samples = tiny_samples(10, prefix="train-")
    del samples[6]["cls"]
    write_tiny(tmp_path, 10, 2, samples=samples)
    url = str(tmp_path / "train-000001.tar")
    for workers in (0, 2):
        loader = build_loader(tmp_path, num_workers=workers, **LOAD)
        assert "train-0006" not in all_keys(loader)
        stats = loader.stats
        assert (stats["samples"], stats["missing_key"], stats["lost"], stats["expected"]) == (9, 1, 1, 10)
        [reason] = stats["reasons"]
        assert "missing key 'cls'" in reason and "train-0006" in reason and url in reason
        assert "the sample has: json, png, txt" in reason


def test_a_split_without_a_required_key_is_refused_before_reading(tmp_path):
    samples = tiny_samples(6, prefix="train-")
    for s in samples:
        del s["txt"]
    write_tiny(tmp_path, 6, 2, samples=samples)
    with pytest.raises(MissingKeyError, match=r"split 'train' of .*index\.json: the task needs 'txt' \(txt is the"):
        build_loader(tmp_path, fields=("cls", "txt"), **LOAD)


def test_missing_image_is_lost_and_counted(tmp_path):
    with wds.TarWriter(str(tmp_path / "train-000000.tar")) as sink:
        sink.write({"__key__": "a", "png": png_bytes(0), "cls": 0})
        sink.write({"__key__": "b", "txt": "no picture", "cls": 1})
    loader = build_loader(tmp_path, num_workers=2, **LOAD)
    assert all_keys(loader) == ["a"] and loader.stats["missing_key"] == 1
    assert "missing image key (one of jpg, jpeg, png, webp)" in loader.stats["reasons"][0]


# -------------------------------------------------------------------------------------------------- resampling


def test_resampled_epochs_are_equal_per_rank_and_seeded(tmp_path):
    write_tiny(tmp_path, 30, 5)
    kw = dict(resampled=True, epoch_samples=30, world_size=2, num_workers=2, **LOAD)
    runs = []
    for rank in (0, 1):
        loader = build_loader(tmp_path, rank=rank, **kw)
        batches = list(loader)
        assert len(batches) == len(loader) == 4 and all(len(b.key) == 4 for b in batches)
        runs.append([k for b in batches for k in b.key])
    assert runs[0] != runs[1]
    assert [k for b in build_loader(tmp_path, rank=0, **kw) for k in b.key] == runs[0]
    assert [k for b in build_loader(tmp_path, rank=0, seed=1, **kw) for k in b.key] != runs[0]
    forever = build_loader(tmp_path, resampled=True, num_workers=2, **LOAD)
    taken = list(itertools.islice(iter(forever), 25))  # more than a pass over the data
    assert len(taken) == 25 and forever.stats["samples"] >= 100
    with pytest.raises(TypeError, match="infinite"):
        len(forever)


# ------------------------------------------------------------------------------------------ batches, transforms


def _solid_png(color, mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (12, 10), color).save(buf, "PNG")
    return buf.getvalue()


def test_batch_format_normalisation_and_channels(tmp_path):
    samples = [{"__key__": f"k{i}", "png": _solid_png((255, 0, 128)), "cls": i % 2} for i in range(3)]
    samples.append({"__key__": "gray", "png": _solid_png(200, "L"), "cls": 1})
    write_shards(samples, tmp_path, "val", class_names=["a", "b"], progress=False)
    loader = build_loader(tmp_path, "val", batch_size=8, image_size=6, num_workers=0, shuffle=False)
    batch = next(iter(loader))
    assert isinstance(batch, Batch) and batch.key == ["k0", "k1", "k2", "gray"]
    assert batch.image.shape == (4, 3, 6, 6) and batch.image.dtype == torch.float32
    assert batch.label.dtype == torch.long and batch.label.tolist() == [0, 1, 0, 1]
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    want = (torch.tensor([255, 0, 128]) / 255 - mean) / std
    torch.testing.assert_close(batch.image[0].mean(dim=(1, 2)), want)
    torch.testing.assert_close(batch.image[3].mean(dim=(1, 2)), (200 / 255 - mean) / std)  # gray -> 3 channels
    gray = next(
        iter(build_loader(tmp_path, "val", batch_size=8, image_size=6, num_workers=0, shuffle=False, channels=1))
    )
    assert gray.image.shape == (4, 1, 6, 6)
    torch.testing.assert_close(gray.image[3], torch.full((1, 6, 6), (200 / 255 - 0.5) / 0.5))
    image, label, key, mask, extra, fields = batch  # unpacks
    assert image is batch.image and label is batch.label and key == batch.key and mask is None and extra == {}
    assert fields is batch.fields and batch.field("cls") is label
    assert batch.to("cpu").image.device.type == "cpu"


def test_augmentation_is_seeded_and_leaves_the_global_rng_alone(tmp_path):
    write_tiny(tmp_path, 16, 2)
    kw = dict(batch_size=8, image_size=6, augment="light")

    def images(num_workers, **extra):
        return torch.cat([b.image for b in build_loader(tmp_path, num_workers=num_workers, **kw, **extra)])

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = images(0)
    assert torch.equal(torch.rand(3), expected)  # num_workers=0 draws from its own RNG
    assert torch.equal(images(0), a)
    assert not torch.equal(images(0, epoch=1), a)
    assert torch.equal(images(2), images(2))


def test_transform_presets():
    img = Image.fromarray(np.arange(16 * 20 * 3, dtype=np.uint8).reshape(16, 20, 3))
    # the fused tensor conversion equals torchvision's three steps
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    reference = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    torch.testing.assert_close(ToNormalizedTensor(mean, std)(img), reference(img))
    torch.testing.assert_close(ToNormalizedTensor(mean, std)(v2.functional.pil_to_tensor(img)), reference(img))
    assert build_transform(8, train=False)(img).shape == (3, 8, 8)
    assert build_transform((8, 6), train=True, augment={"hflip": False, "scale": (0.9, 1.0)})(img).shape == (3, 8, 6)
    assert build_transform(8, train=True, augment="crop", channels=1, mean=[0.1], std=[0.2])(
        img.convert("L")
    ).shape == (
        1,
        8,
        8,
    )
    with pytest.raises(ValueError, match="unknown augment"):
        build_transform(8, train=True, augment="heavy")
    with pytest.raises(ValueError, match="mean/std need 3 values"):
        build_transform(8, train=False, mean=[0.5])


def test_argument_errors(tmp_path):
    write_tiny(tmp_path, 4, 1)
    with pytest.raises(ValueError, match=r"rank 2 outside 0\.\.1"):
        build_loader(tmp_path, rank=2, world_size=2, **LOAD)
    with pytest.raises(ValueError, match="epoch_samples is for resampled"):
        build_loader(tmp_path, epoch_samples=10, **LOAD)
    with pytest.raises(FileNotFoundError, match=r"no index\.json"):
        build_loader(Path(tmp_path / "nothing").mkdir() or tmp_path / "nothing", **LOAD)


# ------------------------------------------------------------------------------------------------------- fields


def test_fields_are_decoded_and_required_ones_name_the_shard(tmp_path):
    write_tiny(tmp_path / "labelled", 8, 2)
    batch = next(iter(build_loader(tmp_path / "labelled", num_workers=0, shuffle=False, **LOAD)))
    assert batch.label.tolist() == [0, 1, 2, 0] and batch.field("cls") is batch.label
    assert batch.fields["txt"] == [f"caption {i}" for i in range(4)] and batch.fields["json"][1] == {"i": 1}

    # captions without labels (webdataset's own writer, no index.json): no label; `txt` required when asked for
    (tmp_path / "captions").mkdir()
    url = str(tmp_path / "captions" / "train-000000.tar")
    with wds.TarWriter(url) as sink:
        for i in range(5):
            sink.write({"__key__": f"b{i}", "png": png_bytes(i), "txt": f"a photo {i}"})
        sink.write({"__key__": "nocap", "png": png_bytes(9)})
    kw = dict(num_workers=0, shuffle=False, batch_size=3, image_size=8, augment="none")
    first, second = list(build_loader(tmp_path / "captions", **kw))
    assert first.label is None and first.fields["txt"] == ["a photo 0", "a photo 1", "a photo 2"]
    assert "txt" not in second.fields, "a field only some samples of a batch carry is left out of that batch"
    with pytest.raises(MissingKeyError, match="no field 'txt'"):
        second.field("txt")
    strict = build_loader(tmp_path / "captions", fields=("txt",), **kw)
    assert [k for b in strict for k in b.key] == [f"b{i}" for i in range(5)] and strict.stats["missing_key"] == 1
    [reason] = strict.stats["reasons"]
    assert "nocap in " in reason and "missing key 'txt'" in reason and url in reason
    with pytest.raises(ValueError, match=r"fields \['caption'\] are not sample fields"):
        build_loader(tmp_path / "captions", fields=("caption",), **kw)
    labelled_without_cls = build_loader(tmp_path / "labelled", fields=("txt",), num_workers=0, **LOAD)
    assert sum(len(b.key) for b in labelled_without_cls) == 8, "a task that needs only txt reads labelled shards"


def test_an_undecodable_field_nobody_asked_for_does_not_cost_the_sample(tmp_path):
    (tmp_path / "s").mkdir()
    with wds.TarWriter(str(tmp_path / "s" / "train-000000.tar")) as sink:
        sink.write({"__key__": "a", "png": png_bytes(0), "txt": "fine", "json": b"{not json"})
        sink.write({"__key__": "b", "png": png_bytes(1), "txt": b"\xff\xfe", "json": {"ok": 1}})
    kw = dict(num_workers=0, shuffle=False, batch_size=4, image_size=8, augment="none")
    loader = build_loader(tmp_path / "s", **kw)
    [batch] = list(loader)
    assert batch.key == ["a", "b"] and loader.stats["lost"] == 0 and batch.fields == {}
    strict = build_loader(tmp_path / "s", fields=("txt",), **kw)
    [batch] = list(strict)
    assert batch.key == ["a"] and strict.stats["corrupt"] == 1, "a required field that does not decode is corrupt"
