"""`PromptFormat`: how an (instruction, answer) pair becomes the token ids and labels of a prefix-LM sample.

The same format must serve training and generation (a train / inference prompt mismatch is the classic cause of
repetition loops), so it is a small serialisable record saved with the checkpoint (`to_dict` / `from_dict`). With a
tokenizer that has a chat template (SmolLM2-Instruct does) the prompt is the rendered user turn plus the generation
prompt, and the answer is exactly what the template renders for the assistant turn after it (its end-of-turn token
included); without one, the prompt is tokenized as is and the answer is followed by the end-of-sequence token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .prefix_lm import IGNORE_INDEX

__all__ = ["PLACEHOLDER_ID", "PromptFormat"]

#: The id that stands for the modality tokens in ``input_ids`` (LLaVA's ``IMAGE_TOKEN_INDEX``): negative, so it is
#: never a real token and needs no new embedding row; `PrefixLMHead` replaces it before anything is embedded.
PLACEHOLDER_ID = -200


@dataclass(frozen=True)
class PromptFormat:
    """Args:
    system: a system message (chat template only), or None.
    chat_template: use the tokenizer's chat template when it has one.
    placeholder: the text that stands for the modality tokens inside the prompt (LLaVA's ``<image>``), or None
        when the modality tokens are a prefix before the text. The rendered prompt is tokenized in the pieces
        around it, joined by `PLACEHOLDER_ID` (the text itself never reaches the tokenizer, so it need not be a
        token of the vocabulary).
    """

    system: str | None = None
    chat_template: bool = True
    placeholder: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PromptFormat:
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown PromptFormat field(s) {unknown}")
        return cls(**data)

    def uses_template(self, tokenizer: Any) -> bool:
        return self.chat_template and bool(getattr(tokenizer, "chat_template", None))

    def _messages(self, prompt: str) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": self.system}] if self.system else []
        return messages + [{"role": "user", "content": prompt}]

    def _render(self, tokenizer: Any, prompt: str, answer: str | None = None) -> str:
        """The prompt (plus the generation prompt), or the whole exchange with `answer`, as text."""
        if self.uses_template(tokenizer):
            messages = self._messages(prompt)
            if answer is None:
                return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            messages = messages + [{"role": "assistant", "content": answer}]
            return tokenizer.apply_chat_template(messages, tokenize=False)
        return prompt

    def prompt_ids(self, tokenizer: Any, prompt: str) -> list[int]:
        """The ids the model reads before it answers (the generation prompt included); the placeholder is
        `PLACEHOLDER_ID`."""
        if self.placeholder is not None and prompt.count(self.placeholder) != 1:
            raise ValueError(f"the prompt must hold the placeholder {self.placeholder!r} exactly once: {prompt!r}")
        if self.placeholder is None:
            if self.uses_template(tokenizer):
                return list(_ids(tokenizer.apply_chat_template(self._messages(prompt), add_generation_prompt=True)))
            return list(tokenizer(prompt).input_ids)
        rendered = self._render(tokenizer, prompt)
        if rendered.count(self.placeholder) != 1:
            raise ValueError(
                f"the rendered prompt holds the placeholder {self.placeholder!r} {rendered.count(self.placeholder)} "
                "times (the system message or the chat template contains it too): choose another placeholder"
            )
        before, after = rendered.split(self.placeholder)
        # a rendered template carries its special tokens as text; a plain prompt gets the tokenizer's own (BOS)
        special = not self.uses_template(tokenizer)
        head = list(tokenizer(before, add_special_tokens=special).input_ids) if before or special else []
        return head + [PLACEHOLDER_ID] + list(tokenizer(after, add_special_tokens=False).input_ids)

    def encode(self, tokenizer: Any, prompt: str, answer: str) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of one sample: labels are -100 on the prompt and the answer's ids after it."""
        head = self.prompt_ids(tokenizer, prompt)
        if self.uses_template(tokenizer) and self.placeholder is None:
            messages = self._messages(prompt) + [{"role": "assistant", "content": answer}]
            full = list(_ids(tokenizer.apply_chat_template(messages)))
            if full[: len(head)] != head:
                raise ValueError(
                    "the tokenizer's chat template does not render the answer after the generation prompt it gives "
                    "(the prompt is not a prefix of prompt + answer); use chat_template=False"
                )
            tail = full[len(head) :]
        elif self.uses_template(tokenizer):
            # tokenized apart from the prompt, as at generation, where the answer's ids follow the prompt's
            rendered, full = self._render(tokenizer, prompt), self._render(tokenizer, prompt, answer)
            if not full.startswith(rendered):
                raise ValueError(
                    "the tokenizer's chat template does not render the answer after the generation prompt it gives "
                    "(the prompt is not a prefix of prompt + answer); use chat_template=False"
                )
            tail = list(tokenizer(full[len(rendered) :], add_special_tokens=False).input_ids)
        else:
            eos = tokenizer.eos_token_id
            tail = list(tokenizer(answer, add_special_tokens=False).input_ids) + ([eos] if eos is not None else [])
        if not tail:
            raise ValueError(f"the answer {answer!r} gives no tokens to learn")
        return head + tail, [IGNORE_INDEX] * len(head) + tail

    def batch(
        self, tokenizer: Any, prompts: Sequence[str], answers: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids``, ``attention_mask`` (and ``labels`` with `answers`) for a batch."""
        if answers is not None and len(answers) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
        rows = [
            self.encode(tokenizer, p, a) if answers is not None else (self.prompt_ids(tokenizer, p), None)
            for p, a in zip(prompts, answers if answers is not None else [None] * len(prompts))
        ]
        length = max(len(ids) for ids, _ in rows)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        for i, (ids, lab) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
            if lab is not None:
                labels[i, : len(lab)] = torch.tensor(lab)
        out = {"input_ids": input_ids, "attention_mask": mask}
        if answers is not None:
            out["labels"] = labels
        return out


def _ids(rendered: Any) -> list[int]:
    """`apply_chat_template(tokenize=True)` returns ids, or a mapping with ``input_ids`` in newer versions."""
    if isinstance(rendered, dict) or hasattr(rendered, "keys"):
        rendered = rendered["input_ids"]
    return list(rendered)
