"""`PromptFormat` with the real SmolLM2 tokenizer: the chat template's own rendering, one format for training and
generation, and the plain format without a template."""

from __future__ import annotations

import pytest

from mmblocks.heads import IGNORE_INDEX, PromptFormat


@pytest.fixture(scope="module")
def tokenizer():
    from mmblocks.llm import load_tokenizer

    return load_tokenizer("smollm2-135m")


def _render(tokenizer, messages, **kwargs) -> list[int]:
    out = tokenizer.apply_chat_template(messages, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_chat_template_renders_prompt_then_answer(tokenizer):
    fmt = PromptFormat(system="Answer in one word.")
    ids, labels = fmt.encode(tokenizer, "What colour is the circle?", "red")
    messages = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "What colour is the circle?"},
    ]
    prompt = _render(tokenizer, messages, add_generation_prompt=True)
    full = _render(tokenizer, messages + [{"role": "assistant", "content": "red"}])
    assert ids == full
    assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert labels[len(prompt) :] == full[len(prompt) :]
    assert tokenizer.decode(labels[len(prompt) :]).startswith("red<|im_end|>")
    # generation reads exactly the prefix training saw before the answer
    assert fmt.prompt_ids(tokenizer, "What colour is the circle?") == prompt


def test_plain_format_appends_eos(tokenizer):
    fmt = PromptFormat(chat_template=False)
    ids, labels = fmt.encode(tokenizer, "Q: colour? A:", " red")
    prompt = tokenizer("Q: colour? A:").input_ids
    answer = tokenizer(" red", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert ids == prompt + answer
    assert labels == [IGNORE_INDEX] * len(prompt) + answer


def test_batch_pads_on_the_right_and_masks_labels(tokenizer):
    fmt = PromptFormat()
    out = fmt.batch(tokenizer, ["a", "two words"], ["x", "y z"])
    assert out["input_ids"].shape == out["labels"].shape == out["attention_mask"].shape
    for i, (p, a) in enumerate([("a", "x"), ("two words", "y z")]):
        ids, labels = fmt.encode(tokenizer, p, a)
        n = len(ids)
        assert out["input_ids"][i, :n].tolist() == ids and out["labels"][i, :n].tolist() == labels
        assert out["attention_mask"][i].sum() == n and (out["labels"][i, n:] == IGNORE_INDEX).all()
    assert "labels" not in fmt.batch(tokenizer, ["a"])


def test_round_trip_and_errors(tokenizer):
    fmt = PromptFormat(system="s", chat_template=False, placeholder="<image>")
    assert PromptFormat.from_dict(fmt.to_dict()) == fmt
    with pytest.raises(ValueError, match="unknown PromptFormat field"):
        PromptFormat.from_dict({"sytem": "typo"})
    with pytest.raises(ValueError, match="placeholder '<image>' exactly once"):
        fmt.encode(tokenizer, "no image here", "x")
