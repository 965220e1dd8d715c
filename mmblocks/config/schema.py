"""The schema of an mmblocks config: the hand-written sections (``data``, the component sections) and those derived from
code (``model.llm`` from `load_blocks`, ``train`` from `TrainSettings`). Choice lists come from the registries and
constants the code uses, imported when first needed (they live on lower floors)."""

from __future__ import annotations

import copy
import functools
from typing import Any

from .fields import BOOL, FLOAT, INT, STR, Component, Field, Schema, fields_from_dataclass, fields_from_signature

__all__ = ["backbone_default", "schema"]


def _tasks():
    from ..tasks import TASKS

    return TASKS


def _backbones():
    from ..models import BACKBONES

    return BACKBONES


def _resolve_backbone(name: str) -> tuple[str, dict[str, Any]]:
    from ..models import resolve_backbone

    return resolve_backbone(name)


def _backbone_builder_args(entry: str) -> tuple[str, ...]:
    from ..models import builder_args

    return builder_args(entry)


def _heads():
    from ..heads import HEADS
    from ..tasks import TASKS  # noqa: F401 (the tasks register the heads they build, e.g. prefix_lm)

    return HEADS


def _text_towers():
    from ..models.text_towers import TEXT_TOWERS

    return TEXT_TOWERS


def _task_head(cfg: dict[str, Any]) -> str:
    return _tasks().get(cfg["task"]["name"]).default_head


def _adapters() -> list[str]:
    from adapters import list_adapters

    return list_adapters()


def _tokenizers() -> list[str]:
    from tokenizers_mm import list_tokenizers

    return list_tokenizers()


def _datasets() -> list[str]:
    from ..data import list_datasets

    return list_datasets()


def _modalities() -> list[str]:
    from ..data import list_codecs

    return list_codecs()


def _augment_presets() -> tuple[str, ...]:
    from ..data.codecs import augment_presets

    return augment_presets()


def _frame_samplings() -> tuple[str, ...]:
    from ..data.codecs import FRAME_SAMPLINGS

    return FRAME_SAMPLINGS


def _channels() -> tuple[int, ...]:
    from ..data.transforms import CHANNELS

    return CHANNELS


def _llm_fields() -> dict[str, Field]:
    from ..llm import load_blocks

    return fields_from_signature(
        load_blocks,
        defaults={"source": "smollm2-135m", "layers": [-1]},
        docs={
            "source": "a local HF folder, a .gguf file, an offline name (smollm2-135m) or random:<family>",
            "layers": "layer indices (negative from the end), applied in this order",
            "config_overrides": "config fields for random:<family> sources",
            "seed": "random-init seed (default: train.seed)",
            "soft_mask": "the schedule of attention: soft (mode/cutoff/unit/r_start/r_end, or a fixed ratio)",
        },
    )


def _train_fields() -> dict[str, Field]:
    from ..train.settings import TrainSettings

    return fields_from_dataclass(TrainSettings)


#: Constructor arguments of a backbone that the encoder builder sets (channels of the data, own tokenizer or not).

_BASE_SCHEMA: Schema = {
    "name": Field(None, STR, nullable=True, doc="run name (default: the config file name)"),
    "task": Component(
        _tasks,
        default="classification",
        builder_args=("num_classes", "class_names"),
        doc="what is learned: a registered task (num_classes comes from model.num_classes or the shards)",
    ),
    "model": {
        "tokenizer": {
            "name": Field(
                None,
                STR,
                nullable=True,
                choices=_tokenizers,
                doc="a registered tokenizer; null: the backbone's own (a ViT's patches, AST's spectrogram patches)",
            ),
            "kwargs": Field({}, (dict,), open_mapping=True, doc="tokenizer arguments (embed_dim = backbone width)"),
        },
        "backbone": Component(
            _backbones,
            default="vit_tiny_patch16_224",
            resolve=_resolve_backbone,
            builder_args=_backbone_builder_args,
            doc="a registered backbone (vit, causal_vit, point_transformer, ast_tiny, videomae_small, ...) or any "
            "timm ViT name, with its constructor arguments",
        ),
        "llm": {  # between these two: the keyword arguments of load_blocks (`schema()`)
            "enabled": Field(False, BOOL, doc="insert LLM blocks (adapter_in -> blocks -> adapter_out)"),
            "tune_kwargs": Field({}, (dict,), open_mapping=True, doc="options of the tuning mode (TUNE_KWARGS)"),
        },
        "adapter_in": {
            "name": Field("linear", STR, choices=_adapters),
            "kwargs": Field({"bias": False}, (dict,), open_mapping=True),
            "init_rms": Field(
                None,
                (int, float, str),
                nullable=True,
                doc="rescale adapter_in on the first training batch so its output has this RMS; 'text': the RMS of "
                "the LLM's own hidden states at the block's input on English text (measured once, cached); null: "
                "as initialised (the center paper)",
            ),
        },
        "adapter_out": {
            "name": Field("linear", STR, choices=_adapters),
            "kwargs": Field({"bias": False}, (dict,), open_mapping=True),
        },
        "insert_at": Field(None, INT, nullable=True, doc="backbone blocks before the LLM stage (default: all)"),
        "stage_residual": Field(
            False,
            BOOL,
            doc="tokens + LLM stage(tokens), adapter_out zero-initialised: the stage starts as the identity (not the "
            "center paper's wiring, which has no residual around the stage)",
        ),
        "head": Component(
            _heads,
            builder_args=("in_dim", "num_classes", "text_tower", "tokenizer"),
            defaults={"pool": None},
            default_from=_task_head,
            doc="the task's head (default: the task's own, e.g. classifier); pool null: the backbone's readout",
        ),
        "text_tower": Component(
            _text_towers,
            optional=True,
            doc="the text tower of a contrastive head (task: contrastive): minilm, open_clip or llm_blocks; null: none",
        ),
        "num_classes": Field(None, INT, nullable=True, doc="default: from the shards' index.json"),
        "init": {
            "checkpoint": Field(None, STR, nullable=True, doc="an mmblocks checkpoint to initialise stages from"),
            "stages": Field(["tokenizer", "backbone"], (list,), doc="stages read from init.checkpoint"),
        },
        "freeze": Field([], (list,), doc="stages without gradients: tokenizer, backbone, llm_stage, head"),
    },
    "data": {
        "dataset": Field(
            None, STR, nullable=True, choices=_datasets, doc="an offline dataset made into `root` when missing"
        ),
        "modality": Field(None, STR, nullable=True, choices=_modalities, doc="default: the index's"),
        "root": Field("runs/data", STR, doc="folder with index.json and the shards"),
        "train_split": Field("train", STR),
        "val_split": Field("val", STR, nullable=True),
        "test_split": Field("test", STR, nullable=True),
        "image_size": Field(32, INT, nullable=True, doc="images: crop/resize side; video: resize frames (null: keep)"),
        "channels": Field(3, INT, choices=_channels),
        "batch_size": Field(64, INT),
        "eval_batch_size": Field(None, INT, nullable=True),
        "num_workers": Field(2, INT),
        "augment": Field(True, BOOL),
        "augment_policy": Field(
            None,
            STR,
            nullable=True,
            choices=_augment_presets,
            doc="augmentation preset when augment is true (images light|crop, points scale_translate|rotate)",
        ),
        "num_points": Field(None, INT, nullable=True, doc="points kept per cloud (null: all)"),
        "sample_rate": Field(16000, INT, doc="audio rate the model expects (files are resampled)"),
        "max_seconds": Field(None, FLOAT, nullable=True, doc="crop longer audio clips"),
        "num_frames": Field(16, INT, doc="video frames per clip"),
        "frame_sampling": Field("uniform", STR, choices=_frame_samplings),
        "frame_stride": Field(1, INT),
        "motion_vectors": Field(False, BOOL, doc="decode the codec motion vectors (batch.extra['motion'])"),
        "resampled": Field(False, BOOL, doc="infinite resampled shards (step-based training)"),
        "max_lost_fraction": Field(
            None,
            FLOAT,
            nullable=True,
            doc="stop when an epoch loses more than this fraction of its samples (corrupt, missing keys, "
            "unreadable shards); null: never",
        ),
    },
    "train": {},  # the fields of TrainSettings (`schema()`)
}


def backbone_default() -> str:
    """The backbone of a config that names none."""
    return _BASE_SCHEMA["model"]["backbone"].default


@functools.lru_cache(maxsize=1)
def schema() -> Schema:
    """The config schema: the hand-written sections with those derived from code filled in (``model.llm`` from
    `load_blocks`, ``train`` from `TrainSettings`; components from their registries when validated)."""
    out = copy.deepcopy(_BASE_SCHEMA)
    llm = out["model"]["llm"]
    out["model"]["llm"] = {"enabled": llm["enabled"], **_llm_fields(), "tune_kwargs": llm["tune_kwargs"]}
    out["train"] = _train_fields()
    return out
