"""Multi-head retention from Python: every form and normalisation against the pure-PyTorch
reference (reference.py, from docs/math.md §2), states carried between forms and the decoding
step, NumPy and torch inputs, strided views, outputs written in place."""

import numpy as np
import pytest
import torch

import reference as ref
import retention

FORMS = ["parallel", "recurrent", "chunkwise"]
NORMS = ["none", "decay", "decay_and_score"]


def rand(*shape, dtype=torch.float64, gen=None):
    return torch.randn(*shape, dtype=dtype, generator=gen)


@pytest.fixture
def gen():
    # Fresh inputs per run (seeded from the OS); a failure prints the seed to reproduce it.
    seed = int(np.random.SeedSequence().entropy % (2**31))
    print(f"seed {seed}")
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("normalization", NORMS)
@pytest.mark.parametrize("B,T,H,dk,dv,chunk", [(2, 37, 3, 8, 5, 0), (1, 1, 1, 1, 1, 0),
                                               (2, 13, 2, 4, 6, 4), (1, 9, 2, 3, 2, 16)])
def test_forms_match_reference(form, normalization, B, T, H, dk, dv, chunk, gen):
    q, k, v = rand(B, T, H, dk, gen=gen), rand(B, T, H, dk, gen=gen), rand(B, T, H, dv, gen=gen)
    gammas = [1.0 - 2.0 ** (-2 - h) for h in range(H - 1)] + [1.0]  # includes gamma = 1
    o = retention.retention(q, k, v, gammas, form=form, chunk=chunk, normalization=normalization)
    assert isinstance(o, torch.Tensor) and o.dtype == torch.float64 and o.shape == (B, T, H, dv)
    assert ref.rel_err(o, ref.retention(q, k, v, gammas, normalization)) <= 1e-12


@pytest.mark.parametrize("form", FORMS)
def test_float32_matches_float64_reference(form, gen):
    q, k, v = rand(2, 40, 2, 16, gen=gen), rand(2, 40, 2, 16, gen=gen), rand(2, 40, 2, 8, gen=gen)
    gammas = retention.retnet_gammas(2)
    o = retention.retention(q.float(), k.float(), v.float(), gammas, form=form,
                            normalization="decay_and_score")
    assert o.dtype == torch.float32
    assert ref.rel_err(o, ref.retention(q, k, v, gammas, "decay_and_score")) <= 1e-5


@pytest.mark.parametrize("normalization", NORMS)
def test_state_hands_off_between_forms_and_step(normalization, gen):
    B, T, H, dk, dv, split = 2, 23, 3, 6, 4, 9
    q, k, v = rand(B, T, H, dk, gen=gen), rand(B, T, H, dk, gen=gen), rand(B, T, H, dv, gen=gen)
    gammas = [0.9, 0.75, 0.99]
    whole = ref.retention(q, k, v, gammas, normalization)
    # Prefix in the parallel form, the middle chunkwise, the tail one decoding step at a time.
    o1, st = retention.retention(q[:, :split], k[:, :split], v[:, :split], gammas, "parallel",
                                 normalization=normalization, return_state=True)
    assert np.array_equal(st.positions, np.full((B, H), split))
    S, z = ref.final_state(k[:, :split], v[:, :split], gammas)
    assert ref.rel_err(st.S, S) <= 1e-12 and ref.rel_err(st.z, z) <= 1e-12
    o2, st = retention.retention(q[:, split:T - 3], k[:, split:T - 3], v[:, split:T - 3], gammas,
                                 "chunkwise", chunk=5, normalization=normalization,
                                 initial_state=st, return_state=True)
    tail = [retention.retention_step(q[:, t], k[:, t], v[:, t], gammas, st, normalization)
            for t in range(T - 3, T)]
    assert np.array_equal(st.positions, np.full((B, H), T))
    got = torch.cat([o1, o2, torch.stack(tail, dim=1)], dim=1)
    assert ref.rel_err(got, whole) <= 1e-12


def test_initial_state_against_reference(gen):
    B, T, H, dk, dv = 2, 11, 2, 4, 3
    q, k, v = rand(B, T, H, dk, gen=gen), rand(B, T, H, dk, gen=gen), rand(B, T, H, dv, gen=gen)
    S0, z0 = rand(B, H, dk, dv, gen=gen), rand(B, H, dk, gen=gen)
    st = retention.RetentionState(B, H, dk, dv)
    st.set(S0.numpy(), z0.numpy(), np.full((B, H), 7, dtype=np.int64))
    gammas = [0.8, 0.95]
    for norm in NORMS:
        want = ref.retention(q, k, v, gammas, norm, S0=S0, z0=z0, position=7)
        for form in FORMS:
            o = retention.retention(q, k, v, gammas, form, chunk=3, normalization=norm,
                                    initial_state=st)
            assert ref.rel_err(o, want) <= 1e-12, (norm, form)
    assert np.array_equal(st.positions, np.full((B, H), 7))  # not advanced without final_state


def test_numpy_in_numpy_out_and_out_written_in_place(gen):
    q, k, v = (rand(1, 10, 2, 4, gen=gen).numpy() for _ in range(3))
    out = np.full((1, 10, 2, 4), np.nan)
    got = retention.retention(q, k, v, [0.9, 0.5], out=out)
    assert got is out and isinstance(got, np.ndarray)
    want = ref.retention(*(torch.from_numpy(a) for a in (q, k, v)), [0.9, 0.5])
    assert ref.rel_err(out, want) <= 1e-12


def test_torch_out_tensor_written_in_place(gen):
    q, k, v = rand(2, 8, 2, 4, gen=gen), rand(2, 8, 2, 4, gen=gen), rand(2, 8, 2, 3, gen=gen)
    out = torch.full((2, 8, 2, 3), float("nan"), dtype=torch.float64)
    ptr = out.data_ptr()
    got = retention.retention(q, k, v, [0.9, 0.7], out=out)
    assert got is out and got.data_ptr() == ptr
    assert ref.rel_err(out, ref.retention(q, k, v, [0.9, 0.7])) <= 1e-12
    # A strided out (a [B, T, H, dv] slice of a wider buffer, rows contiguous) is written in
    # place, the rest of the buffer untouched.
    wide = torch.zeros(2, 8, 2, 5, dtype=torch.float64)
    retention.retention(q, k, v, [0.9, 0.7], out=wide[..., 1:4])
    assert torch.all(wide[..., 0] == 0) and torch.all(wide[..., 4] == 0)
    assert ref.rel_err(wide[..., 1:4], ref.retention(q, k, v, [0.9, 0.7])) <= 1e-12


def test_strided_inputs_read_in_place(gen):
    # q, k, v as column blocks of one fused [B, T, H, 3d] projection and a [B, H, T, D] tensor
    # permuted to [B, T, H, D]: rows stay contiguous, no copy needed.
    B, T, H, d = 2, 12, 3, 4
    fused = rand(B, T, H, 3 * d, gen=gen)
    q, k, v = fused[..., :d], fused[..., d:2 * d], fused[..., 2 * d:]
    assert not q.is_contiguous()
    o = retention.retention(q, k, v, [0.9, 0.8, 0.7], "chunkwise", chunk=5,
                            normalization="decay_and_score")
    assert ref.rel_err(o, ref.retention(q.contiguous(), k.contiguous(), v.contiguous(),
                                        [0.9, 0.8, 0.7], "decay_and_score")) <= 1e-12
    bhtd = rand(B, H, T, d, gen=gen)
    qp = bhtd.permute(0, 2, 1, 3)
    o = retention.retention(qp, qp, qp, [0.9, 0.8, 0.7], "parallel")
    assert ref.rel_err(o, ref.retention(qp.contiguous(), qp.contiguous(), qp.contiguous(),
                                        [0.9, 0.8, 0.7])) <= 1e-12


def test_backward_matches_reference_autograd(gen):
    B, T, H, dk, dv = 2, 14, 2, 5, 3
    q, k, v = rand(B, T, H, dk, gen=gen), rand(B, T, H, dk, gen=gen), rand(B, T, H, dv, gen=gen)
    g = rand(B, T, H, dv, gen=gen)
    gammas = [0.85, 0.97]
    for norm in NORMS:
        qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
        ref.retention(qr, kr, vr, gammas, norm).backward(g)
        for form in FORMS:
            dq, dk_, dv_ = retention.retention_backward(q, k, v, g, gammas, form, chunk=4,
                                                        normalization=norm)
            for got, want in ((dq, qr.grad), (dk_, kr.grad), (dv_, vr.grad)):
                assert ref.rel_err(got, want) <= 1e-11, (norm, form)


def test_backward_state_gradients(gen):
    # dL/dS0 and dL/dz0 through an initial state, and dS_final feeding in: against autograd of the
    # reference with the state as a leaf.
    B, T, H, dk, dv = 1, 9, 2, 3, 4
    q, k, v = rand(B, T, H, dk, gen=gen), rand(B, T, H, dk, gen=gen), rand(B, T, H, dv, gen=gen)
    S0, z0 = rand(B, H, dk, dv, gen=gen), rand(B, H, dk, gen=gen)
    g, gS = rand(B, T, H, dv, gen=gen), rand(B, H, dk, dv, gen=gen)
    gammas = [0.9, 0.6]
    st = retention.RetentionState(B, H, dk, dv)
    st.set(S0.numpy(), z0.numpy(), np.zeros((B, H), dtype=np.int64))
    dfin = retention.RetentionState(B, H, dk, dv)
    dfin.set(gS.numpy(), np.zeros((B, H, dk)), np.zeros((B, H), dtype=np.int64))
    Sr, zr = S0.clone().requires_grad_(), z0.clone().requires_grad_()
    qr = q.clone().requires_grad_()
    o = ref.retention(qr, k, v, gammas, "none", S0=Sr, z0=zr)
    Sf, _ = ref.final_state(k, v, gammas, S0=Sr, z0=zr)
    ((o * g).sum() + (Sf * gS).sum()).backward()
    for form in FORMS:
        dq, _, _, d_init = retention.retention_backward(
            q, k, v, g, gammas, form, chunk=2, initial_state=st, final_state_grad=dfin,
            return_state_grad=True)
        assert ref.rel_err(dq, qr.grad) <= 1e-12
        assert ref.rel_err(d_init.S, Sr.grad) <= 1e-12


def test_gamma_schedules():
    assert retention.retnet_gammas(3) == [1 - 2 ** -5, 1 - 2 ** -6, 1 - 2 ** -7]
    lin = retention.linspace_gammas(4)
    assert lin[0] == pytest.approx(1 - 1 / 32, rel=1e-15)
    assert lin[-1] == pytest.approx(1 - 1 / 512, rel=1e-15)
    rmt = retention.rmt_gammas(4, 2.0, 4.0)
    assert rmt[1] == pytest.approx(1 - 2 ** -3, rel=1e-15)
    with pytest.raises(ValueError, match="rmt_gammas"):
        retention.rmt_gammas(2, -1.0, 4.0)
