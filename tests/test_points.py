"""Point-cloud grouping against NumPy references, and the `points` tokenizer."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from tokenizers_mm import create_tokenizer
from tokenizers_mm.points import MiniPointNet, PointGroups, _knn_dense, farthest_point_sample, group_points, knn_group


def numpy_fps(xyz: np.ndarray, n: int, start: int) -> np.ndarray:
    """The textbook loop: keep each point's distance to the chosen set, take the farthest."""
    chosen = [start]
    dist = np.full(len(xyz), np.inf)
    for _ in range(n - 1):
        dist = np.minimum(dist, ((xyz - xyz[chosen[-1]]) ** 2).sum(-1))
        chosen.append(int(dist.argmax()))
    return np.array(chosen)


def _clouds(b=3, p=400, seed=0) -> torch.Tensor:
    return torch.rand(b, p, 3, generator=torch.Generator().manual_seed(seed)) * torch.tensor([2.0, 1.0, 0.5])


@pytest.mark.parametrize("starts", [None, [0, 17, 399]])
def test_fps_equals_numpy_reference(starts):
    xyz = _clouds()
    start = torch.tensor(starts) if starts is not None else None
    ours = farthest_point_sample(xyz, 48, start=start)
    for i in range(3):
        ref = numpy_fps(xyz[i].double().numpy(), 48, starts[i] if starts else 0)
        np.testing.assert_array_equal(ours[i].numpy(), ref)


def test_fps_with_padding_equals_the_unpadded_cloud():
    xyz = _clouds(b=2, p=300)
    padded = torch.cat([xyz, torch.full((2, 100, 3), 50.0)], dim=1)  # far away: would win if not masked
    mask = torch.ones(2, 400, dtype=torch.bool)
    mask[:, 300:] = False
    mask[1, 250:] = False  # a smaller second cloud
    ours = farthest_point_sample(padded, 32, mask=mask)
    np.testing.assert_array_equal(ours[0].numpy(), numpy_fps(xyz[0].double().numpy(), 32, 0))
    np.testing.assert_array_equal(ours[1].numpy(), numpy_fps(xyz[1, :250].double().numpy(), 32, 0))
    assert (ours < torch.tensor([[300], [250]])).all()


def test_knn_equals_brute_force():
    xyz = _clouds(b=2, p=500)
    centers = xyz[:, ::25]
    idx = knn_group(xyz, centers, 16)
    for b in range(2):
        d = ((centers[b, :, None].double() - xyz[b, None].double()) ** 2).sum(-1).numpy()
        ref = np.argsort(d, axis=1, kind="stable")[:, :16]
        np.testing.assert_array_equal(idx[b].numpy(), ref)


def _sq_dist(xyz, centers):
    """Brute force [B, n, P] in the expression knn_group ranks by: ((x-cx)^2 + (y-cy)^2) + (z-cz)^2."""
    d = (xyz[:, None, :, 0] - centers[:, :, None, 0]).square()
    d = d + (xyz[:, None, :, 1] - centers[:, :, None, 1]).square()
    return d + (xyz[:, None, :, 2] - centers[:, :, None, 2]).square()


def _assert_exact_knn(xyz, centers, k, mask=None, knn=knn_group):
    """The oracle: the chosen points' distances are the k smallest (ties at the k-th may pick either point), nearest
    first, each point once, never a padded one."""
    idx = knn(xyz, centers, k, mask=mask)
    assert idx.shape == (*centers.shape[:2], k) and idx.dtype == torch.long
    d = _sq_dist(xyz, centers)
    if mask is not None:
        d = d.masked_fill(~mask[:, None], float("inf"))
        assert mask.gather(1, idx.flatten(1)).all()
    torch.testing.assert_close(d.gather(-1, idx), d.topk(k, dim=-1, largest=False).values, rtol=0, atol=0)
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all()
    return idx


def _shaped_clouds(kind, b, p, gen):
    if kind == "clusters":  # dense blobs far apart
        centres = torch.randn(b, 4, 3, generator=gen) * 10
        return centres[:, torch.randint(0, 4, (p,), generator=gen)] + torch.randn(b, p, 3, generator=gen) * 0.01
    if kind == "sphere":  # a surface, far from the origin
        x = torch.randn(b, p, 3, generator=gen)
        return x / x.norm(dim=-1, keepdim=True) + 1000.0
    if kind == "grid":  # many exact ties
        return torch.randint(0, 5, (b, p, 3), generator=gen).float() * 0.25
    if kind == "duplicates":
        return torch.rand(b, 6, 3, generator=gen)[:, torch.randint(0, 6, (p,), generator=gen)]
    if kind == "flat":
        return torch.rand(b, p, 3, generator=gen) * torch.tensor([1.0, 1.0, 0.0])
    return torch.rand(b, p, 3, generator=gen)


@pytest.mark.parametrize("kind", ["uniform", "clusters", "sphere", "grid", "duplicates", "flat"])
@pytest.mark.parametrize(("p", "n", "k"), [(1000, 40, 32), (333, 50, 7), (70, 5, 70), (2500, 30, 1)])
@pytest.mark.parametrize("dense", [None, 1.0])  # None: as shipped; 1.0: never falls back to brute force
def test_knn_is_exact_on_awkward_clouds(monkeypatch, kind, p, n, k, dense):
    from tokenizers_mm import points

    if dense is not None:
        monkeypatch.setattr(points, "_DENSE", dense)
    gen = torch.Generator().manual_seed(p + k)
    xyz = _shaped_clouds(kind, 2, p, gen)
    centers = xyz[:, torch.randperm(p, generator=gen)[:n]]
    _assert_exact_knn(xyz, centers, k)
    _assert_exact_knn(xyz.double(), centers.double(), k)
    off = centers + torch.randn(centers.shape, generator=gen)  # centres that are not points of the cloud
    _assert_exact_knn(xyz, off, k)
    _assert_exact_knn(xyz, off, k, knn=lambda *a, mask: _knn_dense(*a, mask))  # the path other devices take


@pytest.mark.parametrize("dense", [None, 0.0, 1.0])  # as shipped, always / never brute force
def test_knn_with_padding_is_exact_and_ignores_padded_values(monkeypatch, dense):
    from tokenizers_mm import points

    if dense is not None:
        monkeypatch.setattr(points, "_DENSE", dense)
    gen = torch.Generator().manual_seed(3)
    xyz = torch.rand(3, 700, 3, generator=gen)
    mask = torch.rand(3, 700, generator=gen) < 0.6  # padding anywhere, not only at the end
    mask[2, 40:] = False  # one small cloud
    centers = torch.rand(3, 25, 3, generator=gen)
    idx = _assert_exact_knn(xyz, centers, 16, mask)
    _assert_exact_knn(xyz, centers, 16, mask, knn=lambda *a, mask: _knn_dense(*a, mask))
    garbage = xyz.masked_fill(~mask[..., None], float("nan"))  # what padding holds must not matter
    torch.testing.assert_close(knn_group(garbage, centers, 16, mask=mask), idx, rtol=0, atol=0)
    with pytest.raises(ValueError, match="fewer than group_size"):
        knn_group(xyz, centers, 41, mask=mask)


def test_fps_ties_take_the_first_point_like_numpy():
    gen = torch.Generator().manual_seed(5)
    xyz = torch.randint(0, 4, (2, 131, 3), generator=gen).float()  # 64 distinct points, many equal distances
    ours = farthest_point_sample(xyz, 100, start=torch.tensor([0, 77]))
    for i, s in enumerate([0, 77]):
        np.testing.assert_array_equal(ours[i].numpy(), numpy_fps(xyz[i].double().numpy(), 100, s))


def test_local_coordinates_are_centred_and_features_kept():
    pts = torch.cat([_clouds(b=2, p=256), torch.rand(2, 256, 2)], dim=-1)  # xyz + 2 features
    groups, centers, center_idx = group_points(pts, num_groups=8, group_size=12)
    assert groups.shape == (2, 8, 12, 5) and centers.shape == (2, 8, 3)
    torch.testing.assert_close(groups[:, :, 0, :3], torch.zeros(2, 8, 3))  # the centre is its own nearest point
    rows = torch.arange(2)[:, None]
    torch.testing.assert_close(groups[:, :, 0, 3:], pts[rows, center_idx][..., 3:])
    torch.testing.assert_close(centers, pts[rows, center_idx][..., :3])


def test_tokenizer_shapes_positions_and_gradients():
    tok = create_tokenizer("points", num_groups=16, group_size=8, embed_dim=32)
    assert isinstance(tok, PointGroups)
    pts = _clouds(b=2, p=256).requires_grad_(False)
    out = tok(pts)
    assert out.x.shape == (2, 17, 32) and out.num_prefix == 1 and out.modality == "points"
    assert out.pos.shape == (2, 17, 3) and torch.all(out.pos[:, 0] == 0)
    out.x.sum().backward()
    assert tok.encoder.first[0].weight.grad is not None and tok.pos_mlp[0].weight.grad is not None


def _point_bert_encoder(enc: MiniPointNet, groups: torch.Tensor) -> torch.Tensor:
    """Point-BERT's own layout: the Conv1d stacks on ``[M, C, K]``."""
    f = enc.first(groups.transpose(1, 2))
    f = enc.second(torch.cat([f.amax(dim=2, keepdim=True).expand_as(f), f], dim=1))
    return f.amax(dim=2)


@pytest.mark.parametrize("train", [True, False])
def test_mini_pointnet_rows_equal_point_berts_conv_layout(train):
    torch.manual_seed(0)
    ours = MiniPointNet(4, 48).train(train)
    with torch.no_grad():  # non-trivial BatchNorm state, so eval mode uses it
        for bn in (ours.first[1], ours.second[1]):
            bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2), bn.weight.normal_(), bn.bias.normal_()
    ref = copy.deepcopy(ours)
    groups = torch.randn(24, 16, 4)
    a, b = ours(groups), _point_bert_encoder(ref, groups)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    a.square().sum().backward()
    b.square().sum().backward()
    # float32 rounding of sums over 384 rows, on the scale of the largest gradient (a conv bias before a training-mode
    # BatchNorm has a true gradient of zero, so both sides hold only rounding there)
    scale = max(float(q.grad.abs().max()) for q in ref.parameters())
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
    for x, y in zip(ours.buffers(), ref.buffers()):  # running statistics move the same way in training
        torch.testing.assert_close(x, y)


def test_tokenizer_padding_equals_unpadded_in_eval():
    tok = PointGroups(num_groups=8, group_size=8, embed_dim=16).eval()
    xyz = _clouds(b=1, p=120)
    padded = torch.cat([xyz, torch.zeros(1, 30, 3)], dim=1)
    mask = torch.ones(1, 150, dtype=torch.bool)
    mask[:, 120:] = False
    with torch.no_grad():
        torch.testing.assert_close(tok(padded, mask=mask).x, tok(xyz).x)


@pytest.mark.parametrize(
    ("points", "kw", "match"),
    [
        (torch.rand(1, 20, 3), {}, "fewer than"),
        (torch.rand(1, 100, 4), {}, r"points expects points \[B, P, 3\], got shape \(1, 100, 4\)"),
        (torch.full((1, 100, 3), float("nan")), {}, "NaN"),
    ],
)
def test_bad_clouds_are_clear_errors(points, kw, match):
    tok = PointGroups(num_groups=32, group_size=32, embed_dim=16)
    with pytest.raises(ValueError, match=match):
        tok(points, **kw)


def test_empty_cloud_after_masking_is_an_error():
    mask = torch.zeros(1, 100, dtype=torch.bool)
    mask[0, :5] = True
    with pytest.raises(ValueError, match="5 real points, fewer than"):
        farthest_point_sample(torch.rand(1, 100, 3), 8, mask=mask)


def _point_encoder(llm_blocks=None):
    from adapters import create_adapter
    from mmblocks.heads import ClassifierHead
    from mmblocks.models import LLMStage, MMEncoder, PointTransformer

    torch.manual_seed(0)
    tok = PointGroups(num_groups=16, group_size=8, embed_dim=32, add_pos=False)
    backbone = PointTransformer(embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.0)
    stage = None
    if llm_blocks is not None:
        d = llm_blocks.hidden_size
        stage = LLMStage(create_adapter("linear", 32, d), llm_blocks, create_adapter("linear", d, 32))
    return MMEncoder(tok, backbone, stage, ClassifierHead(32, 4), insert_at=1 if stage else None)


def _randomise_(module: torch.nn.Module, seed: int) -> None:
    """Every parameter of `module` random (weights N(0, 1/fan_in), everything else - biases, norm scales, cls token
    and cls position - N(0, 1)), seeded; every BatchNorm's running statistics random too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            std = math.prod(p.shape[1:]) ** -0.5 if p.dim() >= 2 and p.shape[0] > 1 else 1.0
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * std)
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g, dtype=torch.float64))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g, dtype=torch.float64) + 0.5)


def _tol(dtype: torch.dtype, k: float) -> dict[str, float]:
    """``assert_close`` tolerances of `k` units of `dtype`'s machine epsilon (against a float64 reference)."""
    eps = torch.finfo(dtype).eps
    return {"rtol": k * eps, "atol": k * eps}


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def reference_point_bert(tokens, backbone) -> tuple[torch.Tensor, torch.Tensor]:
    """Point-BERT's transformer written out in float64 (``TransformerEncoder.forward``: ``x = block(x + pos)`` for
    every block, ``pos = MLP(centre)``: Linear(3, 128) -> GELU -> Linear(128, D), the cls token's position a learned
    vector), then the final LayerNorm. Only timm's `Block` (the external library) is reused, from a float64 copy.
    Returns ``(before the final norm, after it)``."""
    lin1, lin2 = backbone.pos_mlp[0], backbone.pos_mlp[2]
    centres = tokens.pos[:, 1:].double()  # the tokens after the cls
    pos = _gelu(centres @ lin1.weight.double().T + lin1.bias.double()) @ lin2.weight.double().T + lin2.bias.double()
    pos = torch.cat([backbone.cls_pos.double().expand(pos.shape[0], -1, -1), pos], dim=1)
    x = tokens.x.double()
    for blk in backbone.blocks:
        x = copy.deepcopy(blk).double()(x + pos)
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    normed = (x - mean) / torch.sqrt(var + backbone.norm.eps)
    normed = normed * backbone.norm.weight.double() + backbone.norm.bias.double()
    return x, normed


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_point_transformer_adds_positions_before_every_block(dtype):
    enc = _point_encoder().eval()
    _randomise_(enc, seed=1)
    enc = enc.to(dtype)
    pts = _clouds(b=2, p=200).to(dtype)
    with torch.no_grad():
        tokens = enc.tokenizer(pts)
        ref_blocks, ref_final = reference_point_bert(tokens, enc.backbone)
        torch.testing.assert_close(enc.forward_features(pts).x.double(), ref_final, **_tol(dtype, 128))
        torch.testing.assert_close(enc.backbone(tokens).x.double(), ref_blocks, **_tol(dtype, 128))
    assert tokens.pos.shape == (2, 17, 3) and enc.tokenizer.pos_mlp is None
    torch.testing.assert_close(tokens.pos[:, 0], torch.zeros(2, 3, dtype=dtype))  # the cls token at the origin


def test_point_encoder_with_frozen_llm_block_trains_the_rest(tiny_checkpoint):
    from mmblocks.llm import load_blocks

    enc = _point_encoder(load_blocks(tiny_checkpoint("llama"), [-1])).train()
    assert enc.layer_names() == ["block.0", "llm", "block.1"]
    logits = enc(_clouds(b=3, p=200))
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    assert all(p.grad is None for p in enc.llm_stage.blocks.parameters())
    assert enc.backbone.pos_mlp[0].weight.grad.abs().sum() > 0
    assert enc.tokenizer.encoder.first[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("rows", [1, 7, 40])
def test_knn_in_steps_of_any_size(monkeypatch, rows):
    from tokenizers_mm import points

    monkeypatch.setattr(points, "_CHUNK_ROWS", rows)  # steps of part of a cloud, of one, of several
    gen = torch.Generator().manual_seed(rows)
    xyz = torch.rand(3, 600, 3, generator=gen)
    _assert_exact_knn(xyz, xyz[:, torch.randperm(600, generator=gen)[:20]], 12)
