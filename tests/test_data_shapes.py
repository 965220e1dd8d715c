"""The ``shapes`` VLM dataset: read back with webdataset itself; held-out pairs, answers and pixels agree."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from mmblocks.data import make_dataset
from mmblocks.data.shapes import COLOURS, HELD_OUT, NUMBERS


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    make_dataset("shapes", out, seed=3, scenes=(200, 40, 40), progress=False)
    samples = {}
    for split in ("train", "val", "test"):
        urls = sorted(str(p) for p in out.glob(f"{split}-*.tar"))
        samples[split] = list(wds.WebDataset(urls, shardshuffle=False))
    return out, samples


def _meta(sample) -> dict:
    return json.loads(sample["json"])


def test_held_out_pairs_only_outside_training(shapes):
    _, samples = shapes
    for sample in samples["train"]:
        pairs = {(o["colour"], o["shape"]) for o in _meta(sample)["shapes"]}
        assert not pairs & set(HELD_OUT)
    for split in ("val", "test"):
        for sample in samples[split]:
            meta = _meta(sample)
            pairs = {(o["colour"], o["shape"]) for o in meta["shapes"]}
            assert pairs & set(HELD_OUT)
            assert {tuple(p) for p in meta["held_out"]} == pairs & set(HELD_OUT)


def test_answers_and_caption_follow_the_shapes(shapes):
    _, samples = shapes
    answers = {"yes": 0, "no": 0}
    for sample in samples["train"] + samples["test"]:
        meta = _meta(sample)
        objects = meta["shapes"]
        pairs = {(o["colour"], o["shape"]) for o in objects}
        assert len(pairs) == len(objects)  # never the same (colour, shape) twice
        left_to_right = sorted(objects, key=lambda o: o["x"])
        assert sample["txt"].decode() == meta["caption"]
        assert meta["caption"].split(" and ")[-1] == f"a {left_to_right[-1]['colour']} {left_to_right[-1]['shape']}"
        for qa in meta["qa"]:
            q, a = qa["question"], qa["answer"]
            if qa["type"] == "count":
                assert a == NUMBERS[len(objects)] and qa["held_out"] is False
            elif qa["type"] == "colour":
                shape = q.removeprefix("what colour is the ").removesuffix("?")
                match = [o for o in objects if o["shape"] == shape]
                assert len(match) == 1 and match[0]["colour"] == a
                assert qa["held_out"] == ((a, shape) in HELD_OUT)
            elif qa["type"] == "side":
                colour, shape = q.removeprefix("is the ").split(" on the")[0].split()
                o = next(o for o in objects if (o["colour"], o["shape"]) == (colour, shape))
                assert a == ("left" if o["x"] < 32 else "right") and abs(o["x"] - 32) >= 8
                assert qa["held_out"] == ((colour, shape) in HELD_OUT)
            else:
                colour, shape = q.removeprefix("is there a ").removesuffix("?").split()
                assert a == ("yes" if (colour, shape) in pairs else "no")
                assert qa["held_out"] == ((colour, shape) in HELD_OUT)
                answers[a] += 1
    assert 0.35 < answers["yes"] / sum(answers.values()) < 0.65


def test_each_shape_is_drawn_in_its_colour(shapes):
    _, samples = shapes
    for sample in samples["val"]:
        image = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"))
        assert image.shape == (64, 64, 3)
        for o in _meta(sample)["shapes"]:
            pixel = image[round(o["y"]), round(o["x"])]
            assert tuple(int(v) for v in pixel) == COLOURS[o["colour"]], o


def test_deterministic_given_the_seed(shapes, tmp_path):
    out, _ = shapes
    again = tmp_path / "again"
    make_dataset("shapes", again, seed=3, scenes=(200, 40, 40), progress=False)
    for tar in sorted(out.glob("*.tar")):
        assert (again / tar.name).read_bytes() == tar.read_bytes()
