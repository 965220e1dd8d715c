"""`tokenizers_mm.vq.VectorQuantizer` against vector-quantize-pytorch 1.32.0 `VectorQuantize` (EMA codebook, straight
through, no rotation trick), NumPy usage statistics, k-means init, dead-code restarts and the errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tokenizers_mm.vq import PAD_INDEX, VectorQuantizer

DISTANCES = ["euclidean", "cosine"]
DIM, K = 16, 32
DECAY, EPS, BETA = 0.9, 1e-3, 0.5  # a large eps, so that the Laplace smoothing shows


def _x(b: int = 4, n: int = 48, d: int = DIM, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(b, n, d, generator=torch.Generator().manual_seed(seed))


def _pair(distance: str, seed: int = 0):
    """Ours and the reference with one codebook (ours copied into the reference's three buffers)."""
    vqp = pytest.importorskip("vector_quantize_pytorch")
    torch.manual_seed(seed)
    ours = VectorQuantizer(DIM, K, distance=distance, decay=DECAY, commitment_weight=BETA, eps=EPS)
    ref = vqp.VectorQuantize(
        DIM,
        K,
        decay=DECAY,
        eps=EPS,
        commitment_weight=BETA,
        kmeans_init=False,
        threshold_ema_dead_code=0,
        rotation_trick=False,
        use_cosine_sim=distance == "cosine",
    )
    cb = ref._codebook
    with torch.no_grad():  # its `codebook` setter writes `embed` only, leaving `embed_avg` at its own init
        cb.embed.copy_(ours.embed[None])
        cb.embed_avg.copy_(ours.embed_avg[None])
        cb.cluster_size.copy_(ours.cluster_size[None])
    return ours, ref


def _assert_same_buffers(ours: VectorQuantizer, ref) -> None:
    cb = ref._codebook
    torch.testing.assert_close(ours.cluster_size, cb.cluster_size[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.embed_avg, cb.embed_avg[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.codebook, ref.codebook, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- the oracle


@pytest.mark.parametrize("distance", DISTANCES)
def test_eval_indices_and_outputs_equal_reference(distance):
    ours, ref = _pair(distance)
    ours.eval(), ref.eval()
    x = _x(scale=2.0)
    before = ours.codebook.clone()
    q, idx, _ = ours(x)
    q_ref, idx_ref, _ = ref(x)
    assert idx.dtype == torch.long and idx.shape == (4, 48)
    torch.testing.assert_close(idx, idx_ref, rtol=0, atol=0)
    torch.testing.assert_close(q, q_ref, rtol=0, atol=0)
    assert len(idx.unique()) > 10  # a real test of the nearest-code search, not one code for everything
    assert torch.equal(ours.codebook, before)  # eval never updates the codebook
    if distance == "cosine":  # the outputs are the unit-norm codes, not rescaled to the input's norm
        torch.testing.assert_close(q.norm(dim=-1), torch.ones(4, 48))


@pytest.mark.parametrize("distance", DISTANCES)
def test_ema_steps_equal_reference(distance):
    ours, ref = _pair(distance)
    ours.train(), ref.train()
    for step in range(3):
        x = _x(seed=10 + step, scale=1.5)
        q, idx, loss = ours(x)
        q_ref, idx_ref, loss_ref = ref(x)
        torch.testing.assert_close(idx, idx_ref, rtol=0, atol=0)
        torch.testing.assert_close(q, q_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-7)
        if step == 0:
            assert not torch.allclose(ours.cluster_size, torch.ones(K))  # the step did move the statistics
            _assert_same_buffers(ours, ref)
    _assert_same_buffers(ours, ref)


@pytest.mark.parametrize("distance", DISTANCES)
def test_commitment_loss_and_straight_through_gradient(distance):
    ours, ref = _pair(distance)
    ours.train(), ref.train()
    x = _x(seed=3, scale=1.5).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    q, _, loss = ours(x)
    q_ref, _, loss_ref = ref(x_ref)
    target = F.normalize(x.detach(), dim=-1) if distance == "cosine" else x.detach()
    torch.testing.assert_close(loss, BETA * F.mse_loss(target, q.detach()))
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=0)

    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(7))
    (grad,) = torch.autograd.grad(q, x, g, retain_graph=True)
    (grad_ref,) = torch.autograd.grad(q_ref, x_ref, g, retain_graph=True)
    torch.testing.assert_close(grad, grad_ref)
    if distance == "euclidean":  # d quantized / d x = identity
        torch.testing.assert_close(grad, g, rtol=0, atol=0)
    else:  # the identity with respect to the normalised input: the Jacobian of the l2 normalisation
        x2 = x.detach().clone().requires_grad_()
        (expected,) = torch.autograd.grad(F.normalize(x2, dim=-1, eps=1e-6), x2, g)
        torch.testing.assert_close(grad, expected)
    (loss_grad,) = torch.autograd.grad(loss, x)
    (loss_grad_ref,) = torch.autograd.grad(loss_ref, x_ref)
    torch.testing.assert_close(loss_grad, loss_grad_ref)


@pytest.mark.parametrize("distance", DISTANCES)
def test_decode_equals_get_output_from_indices(distance):
    ours, ref = _pair(distance)
    idx = torch.randint(K, (3, 20), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours.decode(idx), ref.get_output_from_indices(idx), rtol=0, atol=0)
    ours.eval()
    q, idx, _ = ours(_x())
    torch.testing.assert_close(ours.decode(idx), q, rtol=0, atol=0)
    padded = idx.clone()
    padded[:, -5:] = PAD_INDEX
    out = ours.decode(padded)
    assert torch.equal(out[:, -5:], torch.zeros(4, 5, DIM)) and torch.equal(out[:, :-5], q[:, :-5])


@pytest.mark.parametrize("distance", DISTANCES)
def test_padding_changes_neither_statistics_nor_loss(distance):
    """A padded batch (padding holding large values, inf and NaN) equals the same real tokens run unpadded."""
    padded_vq, ref = _pair(distance)
    packed_vq = VectorQuantizer(DIM, K, distance=distance, decay=DECAY, commitment_weight=BETA, eps=EPS)
    packed_vq.load_state_dict(padded_vq.state_dict())
    padded_vq.train(), packed_vq.train(), ref.train()
    lengths = [48, 30, 5, 17]
    mask = torch.arange(48)[None] < torch.tensor(lengths)[:, None]
    for step in range(2):
        x = _x(seed=20 + step, scale=1.5)
        real = x[mask]
        garbage = x.masked_fill(~mask[..., None], 40.0)
        garbage[3, -1, 0], garbage[2, -1, 1] = float("nan"), float("inf")
        q, idx, loss = padded_vq(garbage, mask)
        q_real, idx_real, loss_real = packed_vq(real[None])
        torch.testing.assert_close(idx[mask], idx_real[0], rtol=0, atol=0)
        torch.testing.assert_close(q[mask], q_real[0])
        assert (idx[~mask] == PAD_INDEX).all() and (q[~mask] == 0).all()
        torch.testing.assert_close(loss, loss_real)
        torch.testing.assert_close(padded_vq.cluster_size, packed_vq.cluster_size)
        torch.testing.assert_close(padded_vq.embed_avg, packed_vq.embed_avg)
        torch.testing.assert_close(padded_vq.codebook, packed_vq.codebook)
        # the reference's masked EMA agrees; its masked commitment loss uses the raw (unnormalised) input for
        # cosine, so the loss is compared on Euclidean only
        _, idx_ref, loss_ref = ref(x, mask=mask)
        torch.testing.assert_close(idx, idx_ref, rtol=0, atol=0)
        if distance == "euclidean":
            torch.testing.assert_close(loss, loss_ref)
        _assert_same_buffers(padded_vq, ref)
    # a batch with no real token leaves every statistic as it was
    state = {k: v.clone() for k, v in padded_vq.state_dict().items()}
    _, idx, loss = padded_vq(_x(seed=30), torch.zeros(4, 48, dtype=torch.bool))
    assert (idx == PAD_INDEX).all() and loss.item() == 0.0
    for key, value in padded_vq.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- k-means, dead codes


def _clusters(n_clusters: int, per: int, dim: int, seed: int, cosine: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``[1, n_clusters * per, dim]`` tight, well-separated Gaussian clusters (on the sphere for cosine), and the
    ``[n_clusters * per]`` cluster of each point."""
    g = torch.Generator().manual_seed(1000 + seed)
    centres = F.normalize(torch.randn(n_clusters, dim, generator=g), dim=-1) * 10.0
    labels = torch.arange(n_clusters).repeat_interleave(per)
    points = centres[labels] + 0.2 * torch.randn(n_clusters * per, dim, generator=g)
    if cosine:
        points = F.normalize(points, dim=-1)
    order = torch.randperm(len(points), generator=g)
    return points[order][None], labels[order]


def _quantisation_error(vq: VectorQuantizer, x: torch.Tensor) -> float:
    vq.eval()
    q, _, _ = vq(x)
    xn = F.normalize(x, dim=-1) if vq.cosine else x
    return (q - xn).square().sum(-1).mean().item()


@pytest.mark.parametrize("distance", DISTANCES)
def test_kmeans_init_uses_every_code_on_separated_clusters(distance):
    n_clusters, dim = 24, 8
    x, labels = _clusters(n_clusters, 40, dim, seed=0, cosine=distance == "cosine")
    torch.manual_seed(0)
    vq = VectorQuantizer(dim, n_clusters, distance=distance, kmeans_init=True, kmeans_iters=5).train()
    assert not vq.initted
    vq(x)
    assert vq.initted
    torch.manual_seed(1)
    random_vq = VectorQuantizer(dim, n_clusters, distance=distance)
    err, random_err = _quantisation_error(vq, x), _quantisation_error(random_vq, x)
    assert err < 0.1 * random_err
    _, idx, _ = vq(x)
    assert vq.usage(idx).used.item() == n_clusters  # every code used
    pairs = set(zip(labels.tolist(), idx[0].tolist()))
    assert len(pairs) == n_clusters  # one code per cluster: none split, none merged
    # Lloyd's fixed point: each code is the mean (for cosine the normalised mean) of the tokens it quantises
    means = torch.zeros(n_clusters, dim).index_add_(0, idx[0], x[0]) / torch.bincount(idx[0])[:, None]
    if distance == "cosine":
        means = F.normalize(means, dim=-1)
    torch.testing.assert_close(vq.codebook, means, rtol=1e-5, atol=1e-5)
    if distance == "cosine":
        torch.testing.assert_close(vq.codebook.norm(dim=-1), torch.ones(n_clusters))
    # the init is deterministic given the torch RNG state, and only runs once (state dicts keep `initted`)
    torch.manual_seed(0)
    again = VectorQuantizer(dim, n_clusters, distance=distance, kmeans_init=True, kmeans_iters=5).train()
    again(x)
    torch.testing.assert_close(again.codebook, vq.codebook, rtol=0, atol=0)
    restored = VectorQuantizer(dim, n_clusters, distance=distance, kmeans_init=True).train()
    restored.load_state_dict(vq.state_dict())
    restored.decay = 1.0  # frozen EMA: any change would come from a second init
    restored(x[:, :50])
    torch.testing.assert_close(restored.codebook, vq.codebook)


def test_kmeans_init_uses_real_positions_only():
    x, _ = _clusters(8, 30, 4, seed=1, cosine=False)
    padded = torch.cat([x, torch.full((1, 40, 4), 1e3)], dim=1)  # padding far away: it would take codes
    mask = torch.ones(1, padded.shape[1], dtype=torch.bool)
    mask[:, x.shape[1] :] = False
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 8, kmeans_init=True, decay=1.0).train()
    vq(padded, mask)
    torch.manual_seed(0)
    plain = VectorQuantizer(4, 8, kmeans_init=True, decay=1.0).train()
    plain(x)
    torch.testing.assert_close(vq.codebook, plain.codebook)
    assert vq.codebook.abs().max() < 100


@pytest.mark.parametrize("distance", DISTANCES)
def test_dead_code_restart_revives_codes(distance):
    """Codes start as one point far from the data: without restarts all but a few (ties go to the first code) die
    and stay dead."""
    n_clusters, dim = 16, 8
    cosine = distance == "cosine"
    x, _ = _clusters(n_clusters, 32, dim, seed=2, cosine=cosine)
    usages = {}
    for threshold in (0.0, 1.0):
        torch.manual_seed(0)
        vq = VectorQuantizer(dim, n_clusters, distance=distance, decay=0.8, dead_code_threshold=threshold)
        start = (torch.randn(dim) * 30.0).expand(n_clusters, dim)
        vq.codebook = start
        vq.train()
        for _ in range(8):
            vq(x)
        _, idx, _ = vq.eval()(x)
        stats = vq.usage(idx, dead_threshold=1.0)
        usages[threshold] = stats.usage.item()
        if threshold == 0:
            assert stats.dead.item() >= n_clusters - 3  # the run does kill codes
    assert usages[0.0] <= 3 / n_clusters
    assert usages[1.0] >= 0.75


def test_dead_code_restart_resets_statistics():
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 6, decay=0.5, dead_code_threshold=0.5).train()
    vq.codebook = torch.tensor([[0.0, 0, 0, 0]] * 3 + [[100.0, 100, 100, 100]] * 3)  # codes 3-5 never win
    x = torch.randn(1, 64, 4)
    vq(x)  # cluster sizes of 3-5: 0.5 * 1 -> 0.5, not yet below
    torch.testing.assert_close(vq.codebook[3:], torch.full((3, 4), 100.0), rtol=1e-4, atol=0)  # still there
    vq(x)  # 0.25 < 0.5: replaced by tokens of the batch, statistics reset to the threshold
    new = vq.codebook[3:]
    assert ((new[:, None] - x[0][None]).abs().amax(dim=-1).min(dim=1).values == 0).all()  # tokens of x
    torch.testing.assert_close(vq.cluster_size[3:], torch.full((3,), 0.5))
    torch.testing.assert_close(vq.embed_avg[3:], new * 0.5)


# ---------------------------------------------------------------------------------------------- statistics


def test_usage_and_perplexity_equal_numpy():
    vq = VectorQuantizer(4, 10)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(7, (3, 50), generator=g)  # codes 7-9 unused
    idx[idx == 2] = 5  # a skewed histogram
    idx[0, :6] = PAD_INDEX
    mask = torch.rand(3, 50, generator=g) > 0.2
    vq.cluster_size.copy_(torch.tensor([0.1, 3.0, 0.9, 5.0, 0.0, 2.0, 1.0, 0.5, 7.0, 0.99]))
    stats = vq.usage(idx, mask)

    ids = idx.numpy()[(idx.numpy() != PAD_INDEX) & mask.numpy()]
    hist = np.bincount(ids, minlength=10)
    p = hist[hist > 0] / hist.sum()
    assert stats.used.item() == (hist > 0).sum()
    assert stats.usage.item() == pytest.approx((hist > 0).mean())
    assert stats.perplexity.item() == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-6)
    assert stats.dead.item() == (vq.cluster_size.numpy() < 1.0).sum()
    assert vq.usage(idx, mask, dead_threshold=2.5).dead.item() == (vq.cluster_size.numpy() < 2.5).sum() == 7
    # without a mask only the PAD_INDEX positions are left out; a uniform histogram has perplexity K
    all_ids = idx.numpy()[idx.numpy() != PAD_INDEX]
    q = np.bincount(all_ids, minlength=10) / len(all_ids)
    q = q[q > 0]
    assert vq.usage(idx).perplexity.item() == pytest.approx(np.exp(-(q * np.log(q)).sum()), rel=1e-6)
    uniform = torch.arange(10).repeat(3, 4)
    assert vq.usage(uniform).perplexity.item() == pytest.approx(10.0, rel=1e-6)
    assert vq.usage(uniform).usage.item() == 1.0


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"distance": "manhattan"}, r"unknown distance 'manhattan'; expected one of \('euclidean', 'cosine'\)"),
        ({"decay": 1.5}, r"decay must be in \[0, 1\], got 1.5"),
        ({"eps": 0.0}, r"eps must be finite and > 0, got 0.0"),
        ({"dead_code_threshold": -1.0}, r"dead_code_threshold must be finite and >= 0"),
        ({"kmeans_iters": -2}, r"kmeans_iters must be an integer >= 0, got -2"),
        ({"commitment_weight": float("nan")}, r"commitment_weight must be finite"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VectorQuantizer(8, 16, **kwargs)
    with pytest.raises(ValueError, match=r"codebook_size must be an integer >= 1, got 0"):
        VectorQuantizer(8, 0)


def test_input_errors():
    vq = VectorQuantizer(8, 16)
    with pytest.raises(ValueError, match=r"expects x \[B, N, D=8\], got shape \(4, 8\)"):
        vq(torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"VectorQuantizer\(dim=8\) expects x \[B, N, D=8\], got shape \(2, 3, 6\)"):
        vq(torch.randn(2, 3, 6))
    with pytest.raises(TypeError, match=r"expects floating-point x \[B, N, D=8\], got torch.int64"):
        vq(torch.ones(2, 3, 8, dtype=torch.long))
    bad = torch.randn(2, 3, 8)
    bad[1, 2, 5] = float("nan")
    bad[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"hold 2 NaN or infinite value\(s\) of 48 entries; expected finite"):
        vq(bad)
    with pytest.raises(ValueError, match=r"mask must be \[B, N\] = \[2, 3\] to match x \(2, 3, 8\), got \(2, 4\)"):
        vq(torch.randn(2, 3, 8), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"mask must have dtype torch.bool \(True = real token\), got torch.float32"):
        vq(torch.randn(2, 3, 8), torch.ones(2, 3))


def test_decode_usage_and_codebook_errors():
    vq = VectorQuantizer(8, 16)
    with pytest.raises(
        ValueError, match=r"decode expects code indices in \[0, 16\) \(or -1 for padding\), got values in \[0, 16\]"
    ):
        vq.decode(torch.tensor([[0, 16]]))
    with pytest.raises(ValueError, match=r"got values in \[-2, 3\]"):
        vq.decode(torch.tensor([[-2, 3]]))
    with pytest.raises(TypeError, match=r"decode expects integer code indices \[B, N\], got torch.float32"):
        vq.decode(torch.zeros(1, 2))
    with pytest.raises(ValueError, match=r"decode expects indices \[B, N\], got shape \(5,\)"):
        vq.decode(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"usage expects code indices in \[0, 16\)"):
        vq.usage(torch.tensor([[3, 99]]))
    with pytest.raises(ValueError, match=r"must be set to a \[K, D\] = \[16, 8\] tensor, got shape \(16, 4\)"):
        vq.codebook = torch.randn(16, 4)
    nan_codebook = torch.zeros(16, 8)
    nan_codebook[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"the new codebook holds 1 NaN"):
        vq.codebook = nan_codebook


@pytest.mark.parametrize("distance", DISTANCES)
def test_codebook_setter_keeps_the_ema_invariant(distance):
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 16, distance=distance, decay=0.5).train()
    vq(_x(d=8))  # cluster sizes no longer ones
    new = torch.randn(16, 8) * 3
    vq.codebook = new
    expected = F.normalize(new, dim=-1) if distance == "cosine" else new
    torch.testing.assert_close(vq.codebook, expected)
    smoothed = (vq.cluster_size + vq.eps) / (vq.cluster_size.sum() + 16 * vq.eps) * vq.cluster_size.sum()
    torch.testing.assert_close(vq.embed_avg / smoothed[:, None], expected)
    # an EMA step with decay 1 keeps the new codebook (no jump back to the old statistics)
    vq.decay = 1.0
    vq(_x(d=8, seed=5))
    torch.testing.assert_close(vq.codebook, expected)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_bf16_autocast_does_not_change_the_codes(distance):
    """Distances, k-means and the EMA run in float32 under autocast (bf16's 2x.c - |c|^2 picks other codes)."""
    torch.manual_seed(0)
    x = torch.randn(4, 256, 16) * 3
    a, b = VectorQuantizer(16, 512, distance=distance), VectorQuantizer(16, 512, distance=distance)
    b.load_state_dict(a.state_dict())
    ia = a.train()(x)[1]
    with torch.autocast("cpu", torch.bfloat16):
        ib = b.train()(x)[1]
    assert torch.equal(ia, ib)
    torch.testing.assert_close(a.embed, b.embed)
