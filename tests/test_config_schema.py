"""One source of truth per knob: the schema is derived from the code it feeds, components validate against their
constructors, renamed keys still load with a warning naming the new key."""

from __future__ import annotations

import dataclasses
import inspect
import re
import warnings

import pytest
import torch
import yaml

from mmblocks import build_encoder, load_config
from mmblocks.config import ConfigDeprecationWarning, ConfigError, schema
from mmblocks.data import build_loader, list_codecs, list_datasets
from mmblocks.data.codecs import FRAME_SAMPLINGS, augment_presets
from mmblocks.heads import POOLING
from mmblocks.layers import ATTENTION_MODES, CAUSAL_IMPLS
from mmblocks.llm import DTYPES, FINAL_NORMS, ROPE_MODES, TUNE_MODES, load_blocks
from mmblocks.recipes import RECIPE_DATA_KEYS, loader_options
from mmblocks.train import TrainSettings

TINY_AST = {"name": "ast_tiny", "embed_dim": 32, "depth": 2, "num_heads": 2}


def test_train_section_is_train_settings():
    fields = schema()["train"]
    assert list(fields) == [f.name for f in dataclasses.fields(TrainSettings)]
    defaults = TrainSettings()
    assert {k: f.default for k, f in fields.items()} == dataclasses.asdict(defaults)
    assert fields["schedule"].choices == ("cosine", "linear", "constant") and fields["amp"].choices[0] == "auto"
    assert fields["lr"].doc, "docs travel from the dataclass"
    assert load_config({})["train"] == {**dataclasses.asdict(defaults), "out_dir": "runs/run"}


def test_llm_section_is_load_blocks_signature():
    fields = schema()["model"]["llm"]
    params = [
        n for n, p in inspect.signature(load_blocks).parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    assert list(fields) == ["enabled", *params, "tune_kwargs"]
    expected = {"attention": ATTENTION_MODES, "rope": ROPE_MODES, "final_norm": FINAL_NORMS, "tune": TUNE_MODES}
    expected |= {"causal_impl": CAUSAL_IMPLS, "dtype": DTYPES}
    for key, choices in expected.items():
        assert fields[key].choices == choices, key
    for key, p in inspect.signature(load_blocks).parameters.items():
        if p.default is not inspect.Parameter.empty:
            assert fields[key].default == p.default, key
    assert load_config({})["model"]["llm"]["source"] == "smollm2-135m"


def test_data_keys_are_build_loader_arguments_or_recipe_keys():
    data = schema()["data"]
    params = set(inspect.signature(build_loader).parameters)
    assert set(data) == (set(data) & params) | set(RECIPE_DATA_KEYS)
    assert set(RECIPE_DATA_KEYS) <= set(data)
    assert data["dataset"].choices() == list_datasets() and data["modality"].choices() == list_codecs()
    assert data["frame_sampling"].choices() == FRAME_SAMPLINGS and data["augment_policy"].choices() == augment_presets()
    assert set(loader_options(load_config({})["data"])) == set(data) - set(RECIPE_DATA_KEYS)


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"model": {"backbone": {"name": "vit_tiny_patch16_244"}}}, r"did you mean 'vit_tiny_patch16_224'"),
        ({"model": {"backbone": {"name": "causal_vit", "rop": "2d"}}}, r"model\.backbone\.rop: unknown key.*'rope'"),
        ({"model": {"backbone": {"name": "causal_vit", "attention": "causl"}}}, r"'causl' is not one of.*'causal'"),
        ({"model": {"backbone": {**TINY_AST, "depth": "two"}}}, r"model\.backbone\.depth: expected int"),
        ({"model": {"backbone": {"name": "vit", "in_chans": 1}}}, r"model\.backbone\.in_chans: unknown key"),
        ({"model": {"head": {"pool": "avg"}}}, r"model\.head\.pool: 'avg' is not one of .*'cls'"),
        ({"task": "clasification"}, r"task\.name: unknown task 'clasification'.*did you mean 'classification'"),
        ({"task": {"top_j": 3}}, r"task\.top_j: unknown key.*did you mean 'top_k'"),
        ({"model": {"llm": {"tune": "lora", "tune_kwargs": {"rank": 4}}}}, r"tune='lora' takes \['alpha'.*\['rank'\]"),
        ({"data": {"augment_policy": "flip"}}, r"data\.augment_policy: 'flip' is not one of"),
    ],
)
def test_component_errors_name_the_key(cfg, match):
    with pytest.raises(ConfigError, match=match):
        load_config(cfg)


def test_components_fill_their_constructor_defaults_and_presets_are_reachable():
    cfg = load_config({"model": {"backbone": TINY_AST, "num_classes": 3}, "task": "classification"})
    assert cfg["model"]["backbone"] == {**TINY_AST, "mlp_ratio": 4.0, "drop_path_rate": 0.0, "norm_eps": 1e-6}
    assert cfg["task"] == {"name": "classification", "label_smoothing": 0.0, "top_k": 5}
    assert cfg["model"]["head"] == {"name": "classifier", "pool": None, "dropout": 0.0}
    encoder = build_encoder(cfg, verbose=False)
    assert encoder.backbone.depth == 2 and encoder.backbone.name == "ast_tiny"
    assert encoder.tokenizer.num_prefix_tokens == 2, "AST's own tokenizer: cls + distillation tokens"
    assert encoder(torch.randn(2, 16000)).shape == (2, 3)
    timm = load_config({"model": {"backbone": {"name": "vit", "timm_model": "vit_small_patch16_224"}}})
    assert timm["model"]["backbone"]["timm_model"] == "vit_small_patch16_224"
    assert "timm_model" not in load_config({})["model"]["backbone"], "fixed by the timm name"


def test_a_validated_config_is_validated_once():
    cfg = load_config({"train": {"epochs": 2}})
    assert load_config(cfg) is cfg
    again = load_config(cfg, ["train.epochs=3"])
    assert again["train"]["epochs"] == 3 and cfg["train"]["epochs"] == 2


def test_renamed_keys_load_with_a_warning_naming_the_new_key(tmp_path):
    old = {
        "model": {
            "backbone": {"type": "point_transformer", "name": "vit_tiny_patch16_224", "embed_dim": 32, "depth": 1},
            "num_classes": 3,
        },
        "train": {"label_smoothing": 0.1},
    }
    with pytest.warns(ConfigDeprecationWarning) as caught:
        cfg = load_config(old)
    messages = " | ".join(str(w.message) for w in caught)
    assert "model.backbone.type is deprecated" in messages and "model.backbone.name" in messages
    assert "train.label_smoothing is deprecated" in messages and "task.label_smoothing" in messages
    assert cfg["model"]["backbone"]["name"] == "point_transformer" and cfg["task"]["label_smoothing"] == 0.1
    assert "label_smoothing" not in cfg["train"]
    dumped = yaml.safe_load(yaml.safe_dump(dict(cfg)))
    with warnings.catch_warnings(record=True) as clean:
        warnings.simplefilter("always")
        assert load_config(dumped) == cfg
    assert not [w for w in clean if issubclass(w.category, ConfigDeprecationWarning)], "a saved config is current"

    with pytest.warns(ConfigDeprecationWarning) as caught:
        causal = load_config(
            {"model": {"backbone": {"type": "causal_vit"}, "tokenizer": {"name": "image_patches_cls_last"}}}
        )
    assert "image_patches with kwargs {cls_position: last}" in str(caught[-1].message)
    assert causal["model"]["tokenizer"]["name"] is None and causal["model"]["backbone"]["name"] == "causal_vit"
    with pytest.warns(ConfigDeprecationWarning):
        vit = load_config({"model": {"tokenizer": {"name": "image_patches_cls_last"}}})
    assert vit["model"]["tokenizer"] == {"name": "image_patches", "kwargs": {"cls_position": "last"}}
    with pytest.warns(ConfigDeprecationWarning, match="model.backbone.type"):
        plain = load_config({"model": {"backbone": {"type": "vit", "name": "vit_small_patch16_224"}}})
    assert plain["model"]["backbone"]["name"] == "vit_small_patch16_224"


def test_choice_lists_come_from_the_code():
    from mmblocks.cli import build_parser

    parser = build_parser()
    show = parser.parse_args(["blocks", "show", "x"])
    assert show.attention == "bidirectional"
    for flag, choices in (("--attention", ATTENTION_MODES), ("--rope", ROPE_MODES), ("--tune", TUNE_MODES)):
        for value in choices:
            assert getattr(parser.parse_args(["blocks", "show", "x", flag, value]), flag[2:]) == value
    with pytest.raises(SystemExit):
        parser.parse_args(["blocks", "show", "x", "--tune", "freeze"])
    with pytest.raises(ConfigError, match=re.escape(f"is not one of {list(POOLING)}")):
        load_config({"model": {"head": {"pool": "avg"}}})


#: What runs saved by the old flat backbone schema hold in config.yaml (every backbone's keys, type beside name).
_OLD_FLAT = {"size": "tiny", "attention": "causal", "causal_impl": "pre_softmax", "soft_mask": None,
             "cls_position": "last", "rope": "1d", "rope_theta": 10000.0, "rope_train_grid": None,
             "name": "vit_tiny_patch16_224", "img_size": None, "patch_size": None, "embed_dim": None, "depth": None,
             "num_heads": None, "mlp_ratio": None, "drop_path_rate": 0.0, "reg_tokens": 0, "class_token": True,
             "no_embed_class": False, "checkpoint_path": None}  # fmt: skip


@pytest.mark.parametrize(
    ("old", "new", "inputs"),
    [
        (
            {"type": "vit", "img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2},
            {"name": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1,
             "num_heads": 2},
            torch.randn(2, 3, 16, 16),
        ),
        (
            {"type": "causal_vit", "img_size": 16, "patch_size": 4, "depth": 1},
            {"name": "causal_vit", "img_size": 16, "patch_size": 4, "depth": 1},
            torch.randn(2, 3, 16, 16),
        ),
        (
            {"type": "point_transformer", "embed_dim": 32, "depth": 1, "num_heads": 2},
            {"name": "point_transformer", "embed_dim": 32, "depth": 1, "num_heads": 2, "drop_path_rate": 0.0},
            torch.randn(2, 64, 3),
        ),
    ],
    ids=["vit", "causal_vit", "point_transformer"],
)  # fmt: skip
def test_a_config_saved_by_the_old_schema_builds_the_same_encoder(old, new, inputs):
    saved = {"model": {"backbone": {**_OLD_FLAT, **old}, "num_classes": 3}, "train": {"label_smoothing": 0.0}}
    if old["type"] == "point_transformer":
        saved["model"]["tokenizer"] = new_tok = {"name": None, "kwargs": {"num_groups": 8, "group_size": 4}}
    with pytest.warns(ConfigDeprecationWarning) as caught:
        cfg = load_config(saved)
    assert any("keys it does not take were dropped" in str(w.message) for w in caught)
    current = {"model": {"backbone": new, "num_classes": 3}}
    if old["type"] == "point_transformer":
        current["model"]["tokenizer"] = new_tok
    torch.manual_seed(0)
    a = build_encoder(cfg, verbose=False).eval()
    torch.manual_seed(0)
    b = build_encoder(current, verbose=False).eval()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    torch.testing.assert_close(a(inputs), b(inputs), rtol=0, atol=0)


def test_the_cls_last_tokenizer_of_old_configs():
    with pytest.warns(ConfigDeprecationWarning):
        cfg = load_config(
            {"model": {"backbone": {"name": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 4, "depth": 1},
                       "tokenizer": {"name": "image_patches_cls_last"}, "num_classes": 3}}
        )  # fmt: skip
    encoder = build_encoder(cfg, verbose=False)
    tokens = encoder.tokenizer(torch.randn(2, 3, 16, 16))
    assert (tokens.num_prefix, tokens.num_suffix) == (0, 1) and encoder.head.pool == "last"
    with pytest.warns(ConfigDeprecationWarning):
        causal = load_config(
            {"model": {"backbone": {"name": "causal_vit_tiny", "img_size": 16, "patch_size": 4, "depth": 1},
                       "tokenizer": {"name": "image_patches_cls_last"}, "num_classes": 3}}
        )  # fmt: skip
    assert causal["model"]["tokenizer"]["name"] is None
    assert build_encoder(causal, verbose=False).tokenizer.cls_position == "last"


def test_shorthand_components_take_overrides_and_prepare_leaves_the_callers_config_alone(tmp_path):
    cfg = load_config({"model": {"backbone": "ast_tiny"}, "task": "classification"}, ["model.backbone.depth=2"])
    assert cfg["model"]["backbone"]["name"] == "ast_tiny" and cfg["model"]["backbone"]["depth"] == 2

    from mmblocks.recipes import prepare

    (tmp_path / "index.json").write_text("not json")  # an unrelated, broken index where the shards would be
    mine = load_config({"data": {"root": str(tmp_path)}, "model": {"backbone": dict(TINY_AST), "num_classes": 3}})
    encoder = build_encoder(mine, verbose=False)  # the count is given: the shards are not read
    assert encoder.head.num_classes == 3
    prepared, _, task = prepare(mine)
    assert task.num_classes == 3 and prepared["model"]["llm"]["seed"] == prepared["train"]["seed"] == 0
    assert mine["model"]["llm"]["seed"] is None, "prepare works on a copy"
