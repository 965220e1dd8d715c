"""The ``prefix_lm`` task: prompts with a placeholder, its metrics against `mmblocks.eval`, the frozen LM's mode, LM
gradient checkpointing, and end to end (config -> trainer -> generations, checkpoint prompt, `mmblocks eval` and
`mmblocks generate`) with a tiny random Llama reading SmolLM2's tokenizer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from data_helpers import short_run
from safetensors.torch import load_file
from tiny_configs import tiny_config

from mmblocks.cli import main as cli_main
from mmblocks.data import make_dataset
from mmblocks.eval import bleu, cider, exact_match, normalize_text
from mmblocks.heads import IGNORE_INDEX, PLACEHOLDER_ID, PromptFormat
from mmblocks.llm import load_tokenizer, set_lm_checkpointing
from mmblocks.recipes import build_trainer
from mmblocks.tasks import PrefixLMMetrics, create_task, prefix_lm_head
from mmblocks.train import checkpoint_info, latest_checkpoint
from tokenizers_mm import Tokens

#: A 4-layer, 64-wide Llama with SmolLM2's vocabulary (its tokenizer drives the text).
TINY_LM = {**tiny_config("llama"), "vocab_size": 49152}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m")


# ---------------------------------------------------------------------------------------------------- prompts
@pytest.mark.parametrize("chat_template", [True, False])
def test_placeholder_prompt_is_the_rendered_prompt_with_one_placeholder_id(tokenizer, chat_template):
    fmt = PromptFormat(system="You answer.", chat_template=chat_template, placeholder="<image>")
    prompt = "<image>\nwhat colour is the circle?"
    ids = fmt.prompt_ids(tokenizer, prompt)
    assert ids.count(PLACEHOLDER_ID) == 1
    rendered = fmt._render(tokenizer, prompt)
    text = tokenizer.decode([i for i in ids if i != PLACEHOLDER_ID])
    assert text == rendered.replace("<image>", "")
    full, labels = fmt.encode(tokenizer, prompt, "red")
    assert full[: len(ids)] == ids and labels[: len(ids)] == [IGNORE_INDEX] * len(ids)
    tail = full[len(ids) :]
    assert labels[len(ids) :] == tail
    if chat_template:  # exactly what the template renders after the generation prompt: "red<|im_end|>\n"
        assert tokenizer.decode(tail) == fmt._render(tokenizer, prompt, "red")[len(rendered) :]
        assert tokenizer.convert_tokens_to_ids("<|im_end|>") in tail
    else:
        assert tail == tokenizer("red", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


def test_generation_stops_at_the_templates_end_of_turn(tokenizer):
    task = create_task("prefix_lm", tokenizer="smollm2-135m")
    task.set_tokenizer(tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in task.stop_ids(task.prompt)


def test_monitor_must_be_a_reported_metric():
    with pytest.raises(ValueError, match="not reported"):
        create_task("prefix_lm", metrics=["bleu"], monitor="bleu")
    with pytest.raises(ValueError, match="eval_loss is off"):
        create_task("prefix_lm", eval_loss=False)
    with pytest.raises(ValueError, match="captions"):
        create_task("prefix_lm", target="qa", prompt="<input> {question}", metrics=["motion"])
    task = create_task("prefix_lm", metrics=["exact_match", "motion"], monitor="exact_match_colour", eval_loss=False)
    assert task.monitor == ("exact_match_colour", "max")
    assert create_task("prefix_lm", metrics=["wer"], monitor="wer").monitor == ("wer", "min")
    no_loss = task.new_metrics(torch.device("cpu"))
    no_loss.add(torch.zeros(()), [{"key": "a", "prompt": "p", "reference": "x", "prediction": "x"}])
    assert no_loss.compute()["loss"] != no_loss.compute()["loss"]  # NaN, never a fake 0


def test_prompt_without_its_placeholder_is_refused(tokenizer):
    with pytest.raises(ValueError, match="exactly once"):
        PromptFormat(placeholder="<image>").prompt_ids(tokenizer, "no image here")
    with pytest.raises(ValueError, match="exactly once"):
        create_task("prefix_lm", prompt="what is it?", placeholder="<image>")
    with pytest.raises(ValueError, match="question"):
        create_task("prefix_lm", target="qa", prompt="<input> describe")
    with pytest.raises(ValueError, match="unknown metric"):
        create_task("prefix_lm", metrics=["rouge"])


# ---------------------------------------------------------------------------------------------------- metrics
def test_metrics_equal_the_eval_functions_per_question_type_and_parse_captions():
    m = PrefixLMMetrics(["exact_match", "bleu", "cider", "motion", "wer"], torch.device("cpu"))
    rows = [
        {"key": "a", "prompt": "p", "reference": "Red", "prediction": "red.", "type": "colour", "held_out": False},
        {"key": "b", "prompt": "p", "reference": "two", "prediction": "three", "type": "count", "held_out": False},
        {"key": "c", "prompt": "p", "reference": "blue", "prediction": "pink", "type": "colour", "held_out": True},
    ]
    caps = [
        {
            "key": "d",
            "prompt": "p",
            "reference": "the digit 3 moves up",
            "prediction": "the digit 3 moves up",
            "digit": 3,
            "direction": 2,
            "held_out": False,
        },
        {
            "key": "e",
            "prompt": "p",
            "reference": "the digit 2 moves up",
            "prediction": "The digit 2 moves left.",
            "digit": 2,
            "direction": 2,
            "held_out": True,
        },
    ]
    m.add(torch.tensor(1.5), rows + caps)
    out = m.compute()
    refs = [normalize_text(r["reference"]) for r in rows + caps]
    hyps = [normalize_text(r["prediction"]) for r in rows + caps]
    assert out["exact_match"] == pytest.approx(exact_match(refs, hyps)) == pytest.approx(2 / 5)
    assert out["exact_match_colour"] == 0.5 and out["exact_match_count"] == 0.0
    assert out["exact_match_held_out"] == 0.0 and out["exact_match_colour_held_out"] == 0.0
    assert "exact_match_count_held_out" not in out
    assert out["bleu4"] == pytest.approx(bleu([[r] for r in refs], hyps)[3])
    assert out["cider"] == pytest.approx(cider([[r] for r in refs], hyps))
    assert out["digit_acc"] == 1.0 and out["direction_acc"] == 0.5 and out["motion_acc"] == 0.5
    assert out["digit_acc_held_out"] == 1.0 and out["direction_acc_held_out"] == 0.0
    assert out["loss"] == pytest.approx(1.5) and out["samples"] == 5


# ---------------------------------------------------------------------------------------------------- the head
def test_a_frozen_lm_stays_in_eval_mode_a_lora_lm_trains():
    frozen = prefix_lm_head(32, lm="random:llama", config_overrides=TINY_LM)
    frozen.train()
    assert frozen.training and not frozen.lm.training and frozen.adapter.training
    lora = prefix_lm_head(32, lm="random:llama", config_overrides=TINY_LM, tune="lora", tune_kwargs={"r": 2})
    lora.train()
    assert lora.lm.training
    assert sum(p.numel() for p in lora.lm.parameters() if p.requires_grad) > 0


def test_lm_checkpointing_gives_the_same_gradients_and_keeps_fewer_activations():
    """A frozen LM in eval mode (where `transformers`' own switch does nothing): the adapter's gradients are
    identical with the layers recomputed, and backward keeps less than half the activations."""
    head = prefix_lm_head(32, lm="random:llama", config_overrides=tiny_config("llama"), markers=False)
    head.train()
    x = Tokens(torch.randn(2, 24, 32, generator=torch.Generator().manual_seed(0)))
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(1))

    def run() -> tuple[list[torch.Tensor], int]:
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t
        ):
            loss = head(x, ids, labels=ids).loss
        head.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in head.adapter.parameters()], sum(saved)

    plain, plain_bytes = run()
    assert set_lm_checkpointing(head.lm) == 4
    ckpt, ckpt_bytes = run()
    set_lm_checkpointing(head.lm, False)
    assert all(torch.equal(a, b) for a, b in zip(plain, ckpt))
    assert ckpt_bytes < 0.5 * plain_bytes


def test_the_tokenizer_must_fit_the_lm_vocabulary(tokenizer):
    task = create_task("prefix_lm", tokenizer="smollm2-135m")
    small = prefix_lm_head(16, lm="random:llama", config_overrides=tiny_config("llama"))
    with pytest.raises(ValueError, match="the LM embeds 128"):
        task.set_tokenizer(tokenizer, small)


# ---------------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    make_dataset("shapes", root, seed=0, scenes=(8, 2, 2), progress=False)
    return root


def _overrides(root, out):
    return [
        *short_run(root, out, steps=3),
        "model.backbone.depth=1",
        "model.head.lm=random:llama",
        "model.head.config_overrides=" + json.dumps(TINY_LM).replace(" ", ""),
        "task.tokenizer=smollm2-135m",
    ]


def test_vlm_task_trains_evaluates_generates_and_keeps_its_prompt(shapes, tmp_path, capsys):
    run = tmp_path / "run"
    overrides = _overrides(shapes, run)
    summary = build_trainer("configs/vlm/shapes_smollm2.yaml", overrides).fit()
    test = summary["test"]
    # every question of the 2 test scenes is asked; exact match per question type
    rows = [json.loads(r) for r in (run / "report" / "predictions_test.jsonl").read_text().splitlines()]
    assert test["samples"] == len(rows) >= 2 * 3
    assert {r["type"] for r in rows} == {"count", "colour", "side", "exists"}
    assert {f"exact_match_{t}" for t in ("count", "colour", "side", "exists")} <= set(test)
    assert all({"key", "prompt", "reference", "prediction"} <= set(r) for r in rows)
    assert "Generations (test)" in (run / "report" / "report.md").read_text()
    # the prompt format travels with every checkpoint
    state = checkpoint_info(latest_checkpoint(run / "checkpoints"))["extra"]["task"]
    assert state["prompt_format"] == {
        "system": "You answer questions about pictures.",
        "chat_template": True,
        "placeholder": "<image>",
    }
    # mmblocks eval writes the predictions beside the metrics
    out = tmp_path / "eval"
    args = [
        "eval",
        "configs/vlm/shapes_smollm2.yaml",
        *overrides,
        "--checkpoint",
        str(run),
        "--splits",
        "test",
        "--out",
        str(out),
    ]
    assert cli_main(args) == 0
    assert json.loads((out / "metrics.json").read_text())["test"]["samples"] == test["samples"]
    again = [json.loads(r) for r in (out / "predictions_test.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in again] == [r["prediction"] for r in rows]  # greedy: the same text
    # mmblocks generate on one image file answers the question it is given, as evaluation did
    with tarfile.open(next(shapes.glob("test-*.tar"))) as tar:
        tar.extractall(tmp_path / "files", filter="data")
    png = sorted((tmp_path / "files").glob("*.png"))[0]
    question = next(r for r in rows if r["key"] == png.stem)
    asked = question["prompt"].split("\n", 1)[1].removesuffix(" Answer with one word.")
    capsys.readouterr()

    def generate(*extra: str) -> int:
        config = ["configs/vlm/shapes_smollm2.yaml", *overrides, *extra]
        return cli_main(["generate", *config, "--checkpoint", str(run), "--input", str(png), "--prompt", asked])

    assert generate() == 0
    assert capsys.readouterr().out.strip() == question["prediction"]
    # another prompt than the training one is refused
    assert generate("task.prompt=<image> {question}") == 2
    assert "trained with" in capsys.readouterr().err
    changed = [*overrides, "task.prompt=<image> {question}", "--checkpoint", str(run), "--out", str(tmp_path / "x")]
    assert cli_main(["eval", "configs/vlm/shapes_smollm2.yaml", *changed]) == 2, "eval checks the prompt too"


def test_qa_training_draws_one_question_per_sample_from_the_seeded_rng(shapes):
    task = create_task("prefix_lm", target="qa", prompt="<input> {question}", tokenizer="smollm2-135m")
    task.set_tokenizer(load_tokenizer("smollm2-135m"))

    class Batch:
        def __init__(self):
            self.key = ["a", "b"]
            self.fields = {"json": [{"qa": [{"question": f"q{i}", "answer": "x", "type": "t"} for i in range(6)]}] * 2}

        def field(self, name):
            return self.fields[name]

    torch.manual_seed(0)
    first = task.examples_of(Batch(), train=True)
    torch.manual_seed(0)
    assert task.examples_of(Batch(), train=True) == first and first[0] == [0, 1]
    index, prompts, _, _ = task.examples_of(Batch(), train=False)
    assert index == [0] * 6 + [1] * 6 and prompts[:2] == ["<input> q0", "<input> q1"]


def test_lm_with_no_modality_matches_generation_of_the_plain_lm(tokenizer):
    """Task.generate with zero-width modality (markers off, no tokens kept) = the LM's own greedy continuation."""
    task = create_task(
        "prefix_lm", prompt="The capital of France is", placeholder=None, chat_template=False, max_new_tokens=5
    )
    head = prefix_lm_head(8, lm="random:llama", config_overrides=TINY_LM, markers=False)
    task.set_tokenizer(tokenizer, head)

    class Model:
        pass

    model = Model()
    model.head = head
    tokens = Tokens(torch.zeros(1, 1, 8), mask=torch.zeros(1, 1, dtype=torch.bool))
    text = task.generate(model, tokens, [task.prompt])[0]
    ids = tokenizer(task.prompt, return_tensors="pt").input_ids
    ref = head.lm.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert text == tokenizer.decode(ref[0, ids.shape[1] :], skip_special_tokens=True).strip()


def test_load_lm_bf16_is_usable_by_the_head():
    head = prefix_lm_head(16, lm="random:llama", config_overrides=TINY_LM, dtype="bfloat16")
    assert next(head.lm.parameters()).dtype == torch.bfloat16
    assert next(head.adapter.parameters()).dtype == torch.float32
    out = head(Tokens(torch.randn(1, 3, 16)), torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6, 7]]))
    assert torch.isfinite(out.loss)


def _torchrun(args: list[str], port: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*cmd, "-m", "mmblocks", *args], capture_output=True, text=True, env=env, timeout=600)


def _train_losses(run: Path, key: str = "loss") -> dict[int, float]:
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if r.get("split") == "train" and key in r}


@pytest.mark.slow
def test_fsdp2_on_two_cpu_processes_equals_ddp_and_resumes_exactly(shapes, tmp_path):
    """FSDP2 (gloo) shards the LM's layers and the model: the same losses, gradient norms and weights as DDP on the
    same two ranks; a run resumed from its step-2 checkpoint repeats steps 3-4 exactly."""
    runs = {}
    for mode in ("true", "false"):
        run = tmp_path / f"fsdp-{mode}"
        args = [*_overrides(shapes, run), "train.max_steps=4", "train.checkpoint_every=2", "data.val_split=null"]
        proc = _torchrun(["train", "configs/vlm/shapes_smollm2.yaml", *args, f"train.fsdp={mode}"], 29541)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[mode] = (run, args)
    (fsdp, args), (ddp, _) = runs["true"], runs["false"]
    assert json.loads((fsdp / "summary.json").read_text())["world_size"] == 2
    losses = _train_losses(fsdp)
    assert sorted(losses) == [1, 2, 3, 4]
    assert losses == pytest.approx(_train_losses(ddp), abs=1e-5)
    assert _train_losses(fsdp, "grad_norm") == pytest.approx(_train_losses(ddp, "grad_norm"), abs=1e-5)
    a = load_file(latest_checkpoint(fsdp / "checkpoints") / "model.safetensors")
    b = load_file(latest_checkpoint(ddp / "checkpoints") / "model.safetensors")
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert not any(".lm." in k and "lora" not in k for k in a), "the frozen LM is never saved"
    # resume from step 2 (the later checkpoint removed): steps 3 and 4 again, the same
    again = tmp_path / "again"
    shutil.copytree(fsdp, again, ignore=shutil.ignore_patterns("step-00000004", "latest", "summary.json"))
    kept = [r for r in (again / "metrics.jsonl").read_text().splitlines() if json.loads(r)["step"] <= 2]
    (again / "metrics.jsonl").write_text("\n".join(kept) + "\n")  # steps 3-4 must be trained again to appear
    args = [a if not a.startswith("train.out_dir=") else f"train.out_dir={again}" for a in args]
    proc = _torchrun(["train", "configs/vlm/shapes_smollm2.yaml", *args, "train.fsdp=true", "--resume"], 29542)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "step-00000002" in proc.stdout
    assert _train_losses(again) == pytest.approx(losses, abs=1e-6)
