"""``shapes``: rendered scenes of 1-4 coloured shapes with a caption and questions whose answers need the image (VLM).

``mmblocks shards make shapes --out DIR`` calls `make_shapes`. Each scene is `size` x `size` RGB (default 64) on a
light grey background with light noise; each shape is a filled circle, square or triangle in one of `COLOURS`, of
side 12..18 px, placed without overlap. A scene never holds the same (colour, shape) twice.

Held-out combinations: the (colour, shape) pairs of `HELD_OUT` never appear in a training scene; every val and test
scene holds at least one of them, so answers about those scenes measure composition (a colour and a shape each seen
in training, never together), not memorisation.

Each sample: ``png``, ``txt`` (the caption: the shapes from left to right, "a red circle, a blue square and a green
triangle"), ``json`` ``{"shapes": [{"colour", "shape", "x", "y", "size"}] (centres, px), "caption", "qa": [{"type",
"question", "answer", "held_out"}], "held_out": [pairs present], "seed"}``. Question types:

* ``count``: "how many shapes are there?" -> "one" .. "four";
* ``colour``: "what colour is the square?" (asked only when the scene has one square) -> the colour;
* ``side``: "is the red circle on the left or the right?" (asked only when its centre is at least `size` / 8 from the
  middle) -> "left" / "right";
* ``exists``: "is there a green triangle?" -> "yes" / "no", with yes and no equally likely.

Deterministic given `seed`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from .registry import register_dataset
from .shards import write_shards

__all__ = ["COLOURS", "HELD_OUT", "SHAPES", "describe_scene", "draw_scene", "make_shapes", "scene_questions"]

SPLITS = ("train", "val", "test")
SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 60, 180),
    "orange": (240, 130, 20),
}
#: (colour, shape) pairs never seen in training; each val / test scene holds at least one.
HELD_OUT: tuple[tuple[str, str], ...] = (("red", "triangle"), ("blue", "circle"), ("yellow", "square"))
NUMBERS = ("zero", "one", "two", "three", "four")


def _place(rng: np.random.Generator, count: int, size: int) -> list[tuple[float, float, int]] | None:
    """Centres and sides of `count` shapes that do not overlap (None if a draw fails; the caller redraws)."""
    out: list[tuple[float, float, int]] = []
    for _ in range(count):
        for _attempt in range(50):
            side = int(rng.integers(12, 19))
            x, y = rng.uniform(side / 2 + 1, size - side / 2 - 1, size=2)
            if all(max(abs(x - a), abs(y - b)) > (side + s) / 2 + 2 for a, b, s in out):
                out.append((float(x), float(y), side))
                break
        else:
            return None
    return out


def _draw_scene_objects(rng: np.random.Generator, count: int, size: int, split: str) -> list[dict[str, Any]]:
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    allowed = [p for p in pairs if p not in HELD_OUT] if split == "train" else pairs
    while True:
        chosen = [allowed[i] for i in rng.choice(len(allowed), size=count, replace=False)]
        if split != "train" and not any(p in HELD_OUT for p in chosen):
            chosen[int(rng.integers(count))] = HELD_OUT[int(rng.integers(len(HELD_OUT)))]
            if len(set(chosen)) < count:
                continue
        places = _place(rng, count, size)
        if places is not None:
            break
    return [
        {"colour": c, "shape": s, "x": round(x, 2), "y": round(y, 2), "size": side}
        for (c, s), (x, y, side) in zip(chosen, places)
    ]


def draw_scene(objects: Sequence[dict[str, Any]], size: int, rng: np.random.Generator):
    """The scene as a PIL image: light grey noisy background, each shape filled in its colour."""
    from PIL import Image, ImageDraw

    background = (200 + rng.integers(-12, 13, size=(size, size, 1))).repeat(3, axis=2).astype(np.uint8)
    image = Image.fromarray(background, "RGB")
    draw = ImageDraw.Draw(image)
    for o in objects:
        x, y, h = o["x"], o["y"], o["size"] / 2
        fill = COLOURS[o["colour"]]
        if o["shape"] == "circle":
            draw.ellipse([x - h, y - h, x + h, y + h], fill=fill)
        elif o["shape"] == "square":
            draw.rectangle([x - h, y - h, x + h, y + h], fill=fill)
        else:
            draw.polygon([(x, y - h), (x - h, y + h), (x + h, y + h)], fill=fill)
    return image


def describe_scene(objects: Sequence[dict[str, Any]]) -> str:
    """The caption: the shapes from left to right ("a red circle, a blue square and a green triangle")."""
    names = [f"a {o['colour']} {o['shape']}" for o in sorted(objects, key=lambda o: o["x"])]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def scene_questions(objects: Sequence[dict[str, Any]], size: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """The question / answer pairs of a scene (see the module docstring for the types and when each is asked);
    ``held_out`` says whether the question is about a held-out (colour, shape) pair (the colour of the one
    triangle that is red, the side of the blue circle, whether there is a yellow square; never a count)."""
    qa = [
        {"type": "count", "question": "how many shapes are there?", "answer": NUMBERS[len(objects)], "held_out": False}
    ]
    kinds = [o["shape"] for o in objects]
    unique = [o for o in objects if kinds.count(o["shape"]) == 1]
    if unique:
        o = unique[int(rng.integers(len(unique)))]
        question = f"what colour is the {o['shape']}?"
        qa.append({"type": "colour", "question": question, "answer": o["colour"], "held_out": _held(o)})
    sided = [o for o in objects if abs(o["x"] - size / 2) >= size / 8]
    if sided:
        o = sided[int(rng.integers(len(sided)))]
        question = f"is the {o['colour']} {o['shape']} on the left or the right?"
        answer = "left" if o["x"] < size / 2 else "right"
        qa.append({"type": "side", "question": question, "answer": answer, "held_out": _held(o)})
    present = {(o["colour"], o["shape"]) for o in objects}
    if rng.random() < 0.5:
        colour, shape = sorted(present)[int(rng.integers(len(present)))]
        answer = "yes"
    else:
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        colour, shape = absent[int(rng.integers(len(absent)))]
        answer = "no"
    held = (colour, shape) in HELD_OUT
    qa.append({"type": "exists", "question": f"is there a {colour} {shape}?", "answer": answer, "held_out": held})
    return qa


def _held(obj: dict[str, Any]) -> bool:
    return (obj["colour"], obj["shape"]) in HELD_OUT


@register_dataset("shapes")
def make_shapes(
    out: str | os.PathLike,
    *,
    seed: int = 0,
    scenes: Sequence[int] = (3000, 300, 300),
    size: int = 64,
    max_count: int = 1000,
    max_bytes: int | str = 1_000_000_000,
    command: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the ``shapes`` VLM dataset (module docstring). Scene j of split s draws everything from
    ``np.random.default_rng([seed, s, j])``. Returns the index contents."""
    if len(scenes) != 3 or any(int(n) < 0 for n in scenes):
        raise ValueError(f"scenes must be three non-negative counts (train, val, test): {scenes}")
    if size < 48:
        raise ValueError(f"size must be at least 48 px to hold four shapes, got {size}")
    description = {
        "name": "shapes",
        "source": "scenes of 1-4 coloured shapes drawn with PIL",
        "seed": seed,
        "colours": list(COLOURS),
        "shapes": list(SHAPES),
        "held_out": [list(p) for p in HELD_OUT],
        "split_policy": "held-out (colour, shape) pairs never in train; every val / test scene holds one",
        "question_types": ["count", "colour", "side", "exists"],
        "size": size,
    }
    command = command or f"mmblocks shards make shapes --out {out} --seed {seed}"
    result: dict[str, Any] = {}
    for s, split in enumerate(SPLITS):
        total = int(scenes[s])
        if total == 0:
            continue

        def samples(split: str = split, s: int = s, total: int = total):
            for j in range(total):
                rng = np.random.default_rng([seed, s, j])
                count = int(rng.integers(1, 5))
                objects = _draw_scene_objects(rng, count, size, split)
                image = draw_scene(objects, size, rng)
                caption = describe_scene(objects)
                meta = {
                    "shapes": objects,
                    "caption": caption,
                    "qa": scene_questions(objects, size, rng),
                    "held_out": [list(p) for p in HELD_OUT if p in {(o["colour"], o["shape"]) for o in objects}],
                    "seed": [seed, s, j],
                }
                yield {"__key__": f"{split}-{j:05d}", "png": image, "txt": caption, "json": meta}

        result = write_shards(
            samples(),
            out,
            split,
            max_count=max_count,
            max_bytes=max_bytes,
            modality="image",
            command=command,
            dataset=description,
            total=total,
            progress=progress,
            overwrite=True,  # make_dataset refused an existing dataset unless asked to replace it
        )
    return result
