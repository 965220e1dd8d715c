"""LR schedules (warm-up + cosine/linear/constant) and weight-decay parameter groups."""

from __future__ import annotations

import io
import itertools
import math

import pytest
import torch
from torch import nn

from mmblocks.train.schedule import WarmupDecay, build_scheduler, param_groups

BASE_LR = 1e-3


def _lrs(schedule: str, total: int = 100, warmup: int = 10, min_ratio: float = 0.1) -> list[float]:
    """The LR used for optimizer step 0, 1, ..., total (scheduler.step() after each optimizer step)."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=BASE_LR)
    sched = build_scheduler(opt, total_steps=total, warmup_steps=warmup, min_lr_ratio=min_ratio, schedule=schedule)
    out = []
    for _ in range(total + 1):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_key_points():
    lrs = _lrs("cosine")
    assert lrs[0] == 0.0  # linear warm-up from 0
    assert lrs[5] == pytest.approx(0.5 * BASE_LR)
    assert lrs[10] == pytest.approx(BASE_LR)  # end of warm-up: the peak
    assert lrs[55] == pytest.approx(BASE_LR * (0.1 + 0.9 * 0.5))  # midpoint of the decay
    assert lrs[100] == pytest.approx(0.1 * BASE_LR)  # end: min_lr_ratio * base
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))  # monotone decay
    assert max(lrs) == pytest.approx(BASE_LR)


def test_linear_and_constant():
    lin = _lrs("linear", min_ratio=0.0)
    assert lin[0] == 0.0 and lin[10] == pytest.approx(BASE_LR)
    assert lin[55] == pytest.approx(0.5 * BASE_LR) and lin[100] == pytest.approx(0.0, abs=1e-12)
    const = _lrs("constant")
    assert const[0] == 0.0 and const[10] == pytest.approx(BASE_LR) and const[100] == pytest.approx(BASE_LR)


def test_no_warmup_and_past_the_end():
    f = WarmupDecay(total_steps=10, warmup_steps=0, min_lr_ratio=0.2)
    assert f(0) == 1.0 and f(10) == pytest.approx(0.2) and f(1000) == pytest.approx(0.2)
    g = WarmupDecay(total_steps=10, warmup_steps=10)  # warm-up takes the whole run
    assert g(5) == 0.5 and g(10) == 1.0 and math.isfinite(g(11))


def test_per_group_lrs_and_state_dict_is_weights_only():
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 0.1}])
    sched = build_scheduler(opt, total_steps=4, warmup_steps=2)
    opt.step()
    sched.step()
    assert sched.get_last_lr() == pytest.approx([0.5, 0.05])
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    sched2 = build_scheduler(opt, total_steps=4, warmup_steps=2)
    sched2.load_state_dict(sd)
    assert sched2.last_epoch == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"total_steps": 0, "warmup_steps": 0}, "total_steps"),
        ({"total_steps": 10, "warmup_steps": 11}, "warmup_steps"),
        ({"total_steps": 10, "warmup_steps": 1, "min_lr_ratio": 1.5}, "min_lr_ratio"),
        ({"total_steps": 10, "warmup_steps": 1, "schedule": "step"}, "schedule"),
    ],
)
def test_bad_arguments(kwargs, match):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=match):
        build_scheduler(opt, **kwargs)


class CustomRMSNorm(nn.Module):  # like HF LlamaRMSNorm: not an nn.LayerNorm subclass
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.reg_token = nn.Parameter(torch.zeros(1, 4, 8))
        self.pos_embed = nn.Parameter(torch.zeros(1, 16, 8))
        self.position_embedding = nn.Embedding(16, 8)
        self.registers = nn.Parameter(torch.zeros(4, 8))
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.rms = CustomRMSNorm(8)
        self.bn = nn.BatchNorm1d(8)
        self.scale = nn.Parameter(torch.ones(8))  # 1-D (e.g. layer scale)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(8, 2, bias=False)


def test_param_groups_decay_rules():
    model = Toy()
    groups = param_groups(model, weight_decay=0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    decay, no_decay = (set(g["param_names"]) for g in groups)
    assert decay == {"proj.weight", "head.weight"}
    assert no_decay == {
        "cls_token",
        "reg_token",
        "pos_embed",
        "position_embedding.weight",
        "registers",
        "proj.bias",
        "norm.weight",
        "norm.bias",
        "rms.weight",
        "bn.weight",
        "bn.bias",
        "scale",
    }
    # frozen parameters are left out, and every trainable one appears exactly once
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in model.parameters() if p.requires_grad)
    assert all(id(p) not in ids for p in model.frozen.parameters())
    # the groups feed an optimizer directly
    opt = torch.optim.AdamW(groups, lr=1e-3)
    assert opt.state_dict()["param_groups"][0]["param_names"] == groups[0]["param_names"]


def test_param_groups_from_named_parameters_tied_and_extra_patterns():
    lin = nn.Linear(4, 4)
    named = [("enc.weight", lin.weight), ("dec.weight", lin.weight), ("enc.bias", lin.bias), ("gate", lin.weight)]
    groups = param_groups(named, 0.1)
    assert [g["param_names"] for g in groups] == [["enc.weight"], ["enc.bias"]]
    groups = param_groups([("adapter.query_tokens", nn.Parameter(torch.zeros(2, 4)))], 0.1, no_decay_patterns=["Query"])
    assert groups == [{"params": groups[0]["params"], "param_names": ["adapter.query_tokens"], "weight_decay": 0.0}]


def test_param_groups_errors():
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(frozen, 0.1)
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(nn.Linear(2, 2), -1.0)
    with pytest.raises(TypeError, match="pairs"):
        param_groups([nn.Parameter(torch.zeros(1))], 0.1)
