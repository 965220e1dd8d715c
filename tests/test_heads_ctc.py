"""`CTCHead`: torch's CTC loss on the right tensors, greedy decoding against a reference, and it learns to spell."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmblocks.heads import CharVocab, CTCHead, create_head
from tokenizers_mm import Tokens


def test_vocab_round_trip_and_unknown_characters():
    vocab = CharVocab.from_texts(["red circle", "blue square"])
    assert len(vocab) == len(set("red circleblue square")) + 1
    assert vocab.decode(vocab.encode("blue circle")) == "blue circle"
    with pytest.raises(ValueError, match=r"\['z'\]"):
        vocab.encode("zebra")


def test_loss_is_torch_ctc_over_the_real_tokens():
    torch.manual_seed(0)
    head = create_head("ctc", 8, vocab_size=6)
    x = torch.randn(2, 10, 8)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 7:] = False
    tokens = Tokens(x, mask=mask, modality="audio")
    log_probs, lengths = head(tokens)
    assert lengths.tolist() == [10, 7]
    targets = [[1, 2, 2, 3], [4, 5]]
    ours = head.loss(log_probs, lengths, targets)
    per_sample = []
    for b, t in enumerate(targets):  # each sample alone, on its real frames only, divided by its target length
        lp = log_probs[b, : lengths[b]].unsqueeze(1)
        loss = F.ctc_loss(lp, torch.tensor([t]), lengths[b : b + 1], torch.tensor([len(t)]), reduction="sum")
        per_sample.append(loss / len(t))
    torch.testing.assert_close(ours, torch.stack(per_sample).mean())


def test_padding_must_come_last():
    mask = torch.tensor([[False, True, True]])
    with pytest.raises(ValueError, match="padding at the end"):
        CTCHead.lengths(Tokens(torch.randn(1, 3, 4), mask=mask, modality="audio"))


def test_greedy_decoding_collapses_repeats_and_drops_blanks():
    path = torch.tensor([[0, 3, 3, 0, 3, 1, 1, 2, 0, 0]])
    log_probs = F.one_hot(path, 4).float().log()
    assert CTCHead.decode(log_probs, torch.tensor([10])) == [[3, 3, 1, 2]]
    assert CTCHead.decode(log_probs, torch.tensor([4])) == [[3]]


def test_it_learns_to_spell_words_from_their_frames():
    """Each word is a sequence of frames, one noisy one-hot frame per letter repeated 2-3 times: a linear CTC head
    learns to read every word back exactly."""
    words = ["red", "blue", "green", "circle", "square"]
    vocab = CharVocab.from_texts(words)
    g = torch.Generator().manual_seed(0)
    frames = []
    for w in words:
        seq = [vocab.encode(c)[0] for c in w for _ in range(2 + (ord(c) % 2))]
        x = F.one_hot(torch.tensor(seq), len(vocab)).float() + 0.1 * torch.randn(len(seq), len(vocab), generator=g)
        frames.append(x)
    n = max(len(f) for f in frames)
    x = torch.zeros(len(words), n, len(vocab))
    mask = torch.zeros(len(words), n, dtype=torch.bool)
    for i, f in enumerate(frames):
        x[i, : len(f)] = f
        mask[i, : len(f)] = True
    tokens = Tokens(x, mask=mask, modality="audio")
    torch.manual_seed(0)
    head = CTCHead(len(vocab), len(vocab))
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    targets = [vocab.encode(w) for w in words]
    for _ in range(300):
        opt.zero_grad()
        head.loss(*head(tokens), targets).backward()
        opt.step()
    decoded = [vocab.decode(ids) for ids in head.decode(*head(tokens))]
    assert decoded == words


def test_special_tokens_are_dropped_and_patch_grids_refused():
    head = CTCHead(4, 5)
    x = torch.randn(2, 7, 4)
    out = head(Tokens(x, grid=(6,), num_prefix=1, modality="audio"))
    assert out.log_probs.shape == (2, 6, 5) and out.lengths.tolist() == [6, 6]
    torch.testing.assert_close(out.log_probs, head(Tokens(x[:, 1:], grid=(6,), modality="audio")).log_probs)
    with pytest.raises(ValueError, match=r"time sequence.*\(2, 3\) grid"):
        head(Tokens(torch.randn(2, 6, 4), grid=(2, 3), modality="audio"))
