"""retention.torch: torch.autograd.gradcheck (float64, central differences against the analytic
backward) through every autograd Function, and the gradients against autograd through the
pure-PyTorch reference."""

import pytest
import torch

import reference as ref
import retention.torch as rt

FORMS = ["parallel", "recurrent", "chunkwise"]
NORMS = ["none", "decay", "decay_and_score"]


def leaves(*shapes, scale=1.0):
    return [(scale * torch.randn(*s, dtype=torch.float64)).requires_grad_() for s in shapes]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("normalization", NORMS)
def test_gradcheck_retention(form, normalization):
    B, T, H, dk, dv = 2, 7, 2, 3, 2
    q, k, v = leaves((B, T, H, dk), (B, T, H, dk), (B, T, H, dv))
    gammas = [0.8, 0.95]

    def f(q, k, v):
        return rt.retention(q, k, v, gammas, form=form, chunk=3, normalization=normalization)

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_gradcheck_retention_detached_score_normalizer():
    # detach_score_normalizer treats max(|r|, 1) as a constant: its gradient is that of
    # u * c / stop_gradient(max(|r|, 1)), checked against the reference with the factor detached.
    B, T, H, dk, dv = 1, 8, 2, 4, 3
    q, k, v = leaves((B, T, H, dk), (B, T, H, dk), (B, T, H, dv), scale=1.5)
    gammas = [0.9, 0.7]
    g = torch.randn(B, T, H, dv, dtype=torch.float64)
    o = rt.retention(q, k, v, gammas, "chunkwise", chunk=3, normalization="decay_and_score",
                     detach_score_normalizer=True)
    o.backward(g)
    qr, kr, vr = (x.detach().clone().requires_grad_() for x in (q, k, v))
    u = ref.retention(qr, kr, vr, gammas, "decay")
    denom = (ref.retention(qr, kr, vr, gammas, "decay") /
             ref.retention(qr, kr, vr, gammas, "decay_and_score")).detach()
    (u / denom).backward(g)
    for a, b in ((q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)):
        assert ref.rel_err(a, b) <= 1e-10


@pytest.mark.parametrize("form", FORMS)
def test_gradients_match_reference_autograd(form):
    B, T, H, dk, dv = 2, 19, 3, 5, 4
    q, k, v = leaves((B, T, H, dk), (B, T, H, dk), (B, T, H, dv))
    qr, kr, vr = (x.detach().clone().requires_grad_() for x in (q, k, v))
    gammas = [0.9, 0.99, 1.0]
    # A loss with a non-trivial (and, through .sum(), an expanded stride-0) incoming gradient.
    w = torch.randn(B, T, H, dv, dtype=torch.float64)
    (rt.retention(q, k, v, gammas, form, chunk=4, normalization="decay_and_score") * w).sum() \
        .backward()
    (ref.retention(qr, kr, vr, gammas, "decay_and_score") * w).sum().backward()
    for a, b in ((q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)):
        assert ref.rel_err(a, b) <= 1e-11
    q.grad = None
    rt.retention(q, k, v, gammas, form).sum().backward()  # grad_output is expanded (stride 0)
    qr.grad = None
    ref.retention(qr, kr, vr, gammas).sum().backward()
    assert ref.rel_err(q.grad, qr.grad) <= 1e-11


def test_gradients_into_strided_inputs():
    # q, k, v as slices of one projection, as a model produces them: gradients flow back into it.
    B, T, H, d = 2, 10, 2, 3
    x = torch.randn(B, T, H, 3 * d, dtype=torch.float64, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    gammas = [0.9, 0.6]
    rt.retention(x[..., :d], x[..., d:2 * d], x[..., 2 * d:], gammas, "parallel").square().sum() \
        .backward()
    ref.retention(xr[..., :d], xr[..., d:2 * d], xr[..., 2 * d:], gammas).square().sum().backward()
    assert ref.rel_err(x.grad, xr.grad) <= 1e-11


@pytest.mark.parametrize("fn,reference", [(rt.masa, ref.masa), (rt.masad, ref.masad)])
def test_masa_masad_forward_and_gradcheck(fn, reference):
    B, Hh, W, H, dk, dv = 2, 3, 4, 2, 3, 2
    N = Hh * W
    q, k, v = leaves((B, N, H, dk), (B, N, H, dk), (B, N, H, dv))
    gammas = [0.75, 0.9]
    o = fn(q, k, v, gammas, Hh, W)
    assert ref.rel_err(o, reference(q, k, v, gammas, Hh, W)) <= 1e-12
    assert torch.autograd.gradcheck(lambda q, k, v: fn(q, k, v, gammas, Hh, W), (q, k, v),
                                    eps=1e-6, atol=1e-7, rtol=1e-6)
    w = torch.randn(B, N, H, dv, dtype=torch.float64)
    qr, kr, vr = (x.detach().clone().requires_grad_() for x in (q, k, v))
    (fn(q, k, v, gammas, Hh, W) * w).sum().backward()
    (reference(qr, kr, vr, gammas, Hh, W) * w).sum().backward()
    for a, b in ((q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)):
        assert ref.rel_err(a, b) <= 1e-11


def test_float32_autograd_runs_in_float32():
    q, k, v = (torch.randn(1, 16, 2, 8, requires_grad=True) for _ in range(3))
    o = rt.retention(q, k, v, [0.9, 0.97], "chunkwise", normalization="decay")
    assert o.dtype == torch.float32
    o.sum().backward()
    assert q.grad.dtype == torch.float32
    qr, kr, vr = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref.retention(qr, kr, vr, [0.9, 0.97], "decay").sum().backward()
    assert ref.rel_err(q.grad, qr.grad) <= 1e-5
