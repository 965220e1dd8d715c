"""``sentences``: short spoken sentences from a small grammar, synthesised offline with espeak-ng, for ASR.

``mmblocks shards make sentences --out DIR`` calls `make_sentences`. Like ``keywords`` (whose synthesis and
voice split it reuses): espeak-ng voices are (accent, variant) combinations split disjointly between train, val and
test, so **val and test are read by voices never heard in training**; each clip draws a speed and a pitch.

* Grammar (`sentence`): six templates over `VOCABULARY` (numbers, colours, sizes, objects in singular and plural,
  verbs, places), e.g. "put the small red cup under the table", "i see seven green birds", "is the blue box near
  the door". Every sentence is lower case with no punctuation: the transcript is exactly what was spoken.
* Audio: mono 16 kHz 16-bit FLAC, trimmed to the speech (see ``keywords``), natural length (about 1..3.5 s), cut at
  `max_seconds` (6 s; never with the defaults).

Each sample: ``flac``, ``txt`` (the transcript), ``json`` ``{"text", "template", "voice", "base_voice", "variant",
"speed", "pitch", "duration", "sample_rate", "seed", "truncated"}``. Deterministic given `seed` (same espeak-ng
version: the same bytes).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from .keywords import (
    ENGLISH_VOICES,
    VARIANTS,
    _voice_name,
    check_voice_options,
    keyword_voice_splits,
    write_spoken_split,
)
from .registry import register_dataset

__all__ = ["TEMPLATES", "VOCABULARY", "make_sentences", "sentence"]

SPLITS = ("train", "val", "test")

NUMBERS = (
    "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve", "thirteen",
    "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty", "thirty", "forty", "fifty",
)  # fmt: skip
COLOURS = (
    "red", "green", "blue", "yellow", "black", "white", "orange", "purple", "pink", "brown", "grey", "gold", "silver",
)  # fmt: skip
SIZES = ("big", "small", "old", "new", "long", "short", "heavy", "light", "tall", "tiny", "round", "soft", "clean")
OBJECTS = {  # singular -> plural
    "ball": "balls", "box": "boxes", "cup": "cups", "chair": "chairs", "book": "books", "car": "cars",
    "dog": "dogs", "cat": "cats", "bird": "birds", "fish": "fish", "hat": "hats", "shoe": "shoes",
    "key": "keys", "pen": "pens", "bag": "bags", "lamp": "lamps", "clock": "clocks", "phone": "phones",
    "apple": "apples", "bottle": "bottles", "plate": "plates", "spoon": "spoons", "coat": "coats",
    "flower": "flowers", "house": "houses", "boat": "boats", "train": "trains", "horse": "horses",
    "mouse": "mice", "child": "children", "table": "tables", "bed": "beds", "door": "doors",
    "window": "windows", "desk": "desks", "shelf": "shelves", "tree": "trees", "wall": "walls", "cake": "cakes",
    "glass": "glasses", "knife": "knives", "fork": "forks", "bowl": "bowls", "sock": "socks", "ring": "rings",
    "coin": "coins", "card": "cards", "map": "maps", "kite": "kites", "drum": "drums", "bell": "bells",
    "star": "stars", "stone": "stones", "leaf": "leaves", "egg": "eggs", "duck": "ducks", "frog": "frogs",
    "sheep": "sheep", "goat": "goats", "cow": "cows", "pig": "pigs", "bus": "buses", "truck": "trucks",
    "plane": "planes", "bike": "bikes", "doll": "dolls", "brush": "brushes", "candle": "candles",
}  # fmt: skip
PLACES = ("table", "chair", "bed", "door", "window", "desk", "shelf", "box", "tree", "wall", "sofa", "floor", "stairs")
PREPOSITIONS = ("on", "under", "near", "behind", "next to", "in front of")
VERBS = (
    "take", "move", "find", "bring", "push", "pull", "open", "close", "paint", "wash", "hold", "drop", "lift",
    "throw", "catch", "carry", "turn", "hide", "show", "fix", "clean", "count", "pick", "touch",
)  # fmt: skip

#: The sentence templates, by name.
TEMPLATES: tuple[str, ...] = ("command", "put", "count", "where", "question", "have")
VOCABULARY: tuple[str, ...] = tuple(
    sorted(
        {w for group in (NUMBERS, COLOURS, SIZES, PLACES, VERBS) for w in group}
        | {w for pair in OBJECTS.items() for w in pair}
        | {w for p in PREPOSITIONS for w in p.split()}
        | {"the", "put", "i", "see", "is", "there", "a", "we", "have", "where"}
    )
)


def sentence(rng: np.random.Generator) -> tuple[str, str]:
    """``(text, template)``: one sentence drawn from the grammar."""

    def pick(options: Sequence[str]) -> str:
        return options[int(rng.integers(len(options)))]

    singular = list(OBJECTS)
    template = pick(TEMPLATES)
    if template == "command":
        text = f"{pick(VERBS)} the {pick(SIZES)} {pick(COLOURS)} {pick(singular)}"
    elif template == "put":
        text = f"put the {pick(COLOURS)} {pick(singular)} {pick(PREPOSITIONS)} the {pick(PLACES)}"
    elif template == "count":
        text = f"i see {pick(NUMBERS)} {pick(COLOURS)} {OBJECTS[pick(singular)]}"
    elif template == "where":
        text = f"the {pick(SIZES)} {pick(singular)} is {pick(PREPOSITIONS)} the {pick(PLACES)}"
    elif template == "question":
        text = f"is the {pick(COLOURS)} {pick(singular)} {pick(PREPOSITIONS)} the {pick(PLACES)}"
    else:
        text = f"we have {pick(NUMBERS)} {pick(SIZES)} {OBJECTS[pick(singular)]}"
    return text, template


@register_dataset("sentences")
def make_sentences(
    out: str | os.PathLike,
    *,
    seed: int = 0,
    clips: Sequence[int] = (3000, 300, 300),
    voices: Sequence[str] = ENGLISH_VOICES,
    variants: Sequence[str] = VARIANTS,
    voice_fractions: Sequence[float] = (0.7, 0.15, 0.15),
    speed_range: Sequence[int] = (130, 210),
    pitch_range: Sequence[int] = (25, 75),
    margin: float = 0.02,
    max_seconds: float = 6.0,
    workers: int | None = None,
    binary: str = "espeak-ng",
    max_count: int = 1000,
    max_bytes: int | str = 1_000_000_000,
    command: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the ``sentences`` ASR dataset (module docstring). Clip j of split s draws its sentence, voice (uniform
    over the split's voices), speed and pitch from ``np.random.default_rng([seed, s, j])``. Returns the index."""
    if len(clips) != 3 or any(int(c) < 0 for c in clips):
        raise ValueError(f"clips must be three non-negative counts (train, val, test): {clips}")
    (s_lo, s_hi), (p_lo, p_hi) = check_voice_options(voices, variants, speed_range, pitch_range, binary)
    splits = keyword_voice_splits(voices, variants, seed=seed, voice_fractions=voice_fractions)
    description = {
        "name": "sentences",
        "source": "espeak-ng speech synthesis of a small grammar (apt-get install espeak-ng)",
        "seed": seed,
        "clips": dict(zip(SPLITS, (int(c) for c in clips))),
        "templates": list(TEMPLATES),
        "vocabulary": list(VOCABULARY),
        "sample_rate": 16_000,
        "speed_range": [s_lo, s_hi],
        "pitch_range": [p_lo, p_hi],
        "split_policy": "by voice: (base voice, variant) combinations disjoint between train, val and test",
        "voices": {split: [_voice_name(b, v) for b, v in splits[split]] for split in SPLITS},
    }
    command = command or f"mmblocks shards make sentences --out {out} --seed {seed}"
    workers = workers or 2 * (os.cpu_count() or 1)
    result: dict[str, Any] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for s, split in enumerate(SPLITS):
            count = int(clips[s])
            if count == 0:
                continue
            jobs = []
            for j in range(count):
                rng = np.random.default_rng([seed, s, j])
                text, template = sentence(rng)
                base, variant = splits[split][int(rng.integers(len(splits[split])))]
                meta = {
                    "text": text,
                    "template": template,
                    "voice": _voice_name(base, variant),
                    "base_voice": base,
                    "variant": variant,
                    "speed": int(rng.integers(s_lo, s_hi + 1)),
                    "pitch": int(rng.integers(p_lo, p_hi + 1)),
                    "seed": [seed, s, j],
                }
                jobs.append((f"{split}-{j:05d}", meta))

            result = write_spoken_split(
                pool,
                [(key, meta["text"], meta, {"txt": meta["text"]}) for key, meta in jobs],
                out,
                split,
                margin=margin,
                max_seconds=max_seconds,
                binary=binary,
                max_count=max_count,
                max_bytes=max_bytes,
                command=command,
                dataset=description,
                progress=progress,
                overwrite=True,  # make_dataset refused an existing dataset unless asked to replace it
            )
    return result
