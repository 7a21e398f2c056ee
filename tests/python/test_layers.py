"""The layers from Python, loaded from PyTorch state_dicts by their names, against PyTorch
references written from docs/math.md §3-§5 (MSR, RMT attention, ViR block); MaSA/MaSAD on NumPy
arrays; the ViR encoder's forms agree."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reference as ref
import retention


def rand(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def theta_shift(x, position=0):
    """x [T, H, dk]: pairs (x_2j, x_2j+1) at position p rotated by p * 10000^(-j/(dk/2-1))."""
    T, H, dk = x.shape
    half = dk // 2
    theta = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / max(half - 1, 1))
    a = torch.arange(position, position + T, dtype=torch.float64)[:, None, None] * theta
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x0 * a.cos() - x1 * a.sin(), x1 * a.cos() + x0 * a.sin()), -1) \
        .reshape(T, H, dk)


def msr_reference(sd, x, heads, gammas, eps=1e-6):
    T, d = x.shape
    dk = d // heads
    q = (x @ sd["q_proj.weight"].T).view(T, heads, dk)
    k = (x @ sd["k_proj.weight"].T).view(T, heads, dk) / math.sqrt(dk)
    v = (x @ sd["v_proj.weight"].T).view(T, heads, -1)
    o = ref.retention(theta_shift(q)[None], theta_shift(k)[None], v[None], gammas,
                      "decay_and_score")[0]
    o = o * (o.pow(2).mean(-1, keepdim=True) + eps).rsqrt()
    g = x @ sd["g_proj.weight"].T
    return (F.silu(g) * o.reshape(T, -1)) @ sd["out_proj.weight"].T


@pytest.mark.parametrize("packed,keep", [(False, True), (True, True), (False, False)])
def test_msr_loads_a_state_dict_and_matches_the_reference(packed, keep):
    d, heads, vd, T = 16, 2, 32, 13
    sd = {n: rand(*s) / 4 for n, s in (("q_proj.weight", (d, d)), ("k_proj.weight", (d, d)),
                                       ("v_proj.weight", (vd, d)), ("g_proj.weight", (vd, d)),
                                       ("out_proj.weight", (d, vd)))}
    layer = retention.MultiScaleRetention(d, heads, value_dim=vd, packed_weights=packed,
                                          keep_buffers=keep)
    assert layer.packed_weights is packed and layer.keep_buffers is keep
    layer.load({"retention." + n: t for n, t in sd.items()}, prefix="retention.")
    x = rand(T, d)
    want = msr_reference(sd, x, heads, retention.retnet_gammas(heads))
    for form in ("parallel", "recurrent", "chunkwise"):
        y = layer.forward(x, form=form, chunk=4)
        assert isinstance(y, torch.Tensor) and ref.rel_err(y, want) <= 1e-12
    # A batch [B, T, d] as B independent sequences.
    xb = torch.stack([x, rand(T, d)])
    yb = layer.forward(xb)
    assert ref.rel_err(yb[0], want) <= 1e-12
    # Prefill then decode equals the full forward.
    st = layer.make_state()
    y1 = layer.prefill(x[:9], st)
    rows = [layer.step(x[t], st) for t in range(9, T)]
    assert st.position == T
    assert ref.rel_err(torch.cat([y1, torch.stack(rows)]), want) <= 1e-12
    # NumPy in, NumPy out.
    assert ref.rel_err(layer.forward(x.numpy()), want) <= 1e-12


def test_msr_reads_16_bit_and_float32_weights_as_stored():
    d, heads = 8, 2
    sd = {n: rand(*s) for n, s in (("q_proj.weight", (d, d)), ("k_proj.weight", (d, d)),
                                   ("v_proj.weight", (d, d)), ("g_proj.weight", (d, d)),
                                   ("out_proj.weight", (d, d)))}
    x = rand(5, d)
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        low = {n: t.to(dt) for n, t in sd.items()}
        a = retention.MultiScaleRetention(d, heads).load(low)
        b = retention.MultiScaleRetention(d, heads).load({n: t.double() for n, t in low.items()})
        assert torch.equal(a.forward(x), b.forward(x)), dt
    with pytest.raises(ValueError, match="missing parameter 'q_proj.weight'"):
        retention.MultiScaleRetention(d, heads).load({})
    with pytest.raises(ValueError, match=r"has shape \[8, 4\], expected \[8, 8\]"):
        retention.MultiScaleRetention(d, heads).load({**sd, "k_proj.weight": rand(8, 4)})
    with pytest.raises(TypeError, match="dtype must be float64 or float32"):
        retention.MultiScaleRetention(d, heads, dtype="int32")
    f32 = retention.MultiScaleRetention(d, heads, dtype=torch.float32).load(sd)
    with pytest.raises(TypeError, match="expected float32"):
        f32.forward(x)
    assert ref.rel_err(f32.forward(x.float()), b.load(sd).forward(x)) <= 1e-5


def rmt_reference(sd, x, heads, gammas, decomposed):
    B, Hh, W, C = x.shape
    N, dk = Hh * W, C // heads
    xs = x.reshape(B, N, C)
    lin = lambda n, t: t @ sd[n + ".weight"].T + sd[n + ".bias"]  # noqa: E731
    q = lin("q_proj", xs).view(B, N, heads, dk)
    k = lin("k_proj", xs).view(B, N, heads, dk) / math.sqrt(dk)
    v = lin("v_proj", xs)
    q = torch.stack([theta_shift(q[b]) for b in range(B)])
    k = torch.stack([theta_shift(k[b]) for b in range(B)])
    vh = v.view(B, N, heads, -1)
    att = (ref.masad if decomposed else ref.masa)(q, k, vh, gammas, Hh, W).reshape(B, N, -1)
    vmap = v.view(B, Hh, W, -1).permute(0, 3, 1, 2)
    lce = F.conv2d(vmap, sd["lepe.conv.weight"], sd["lepe.conv.bias"], padding=2,
                   groups=vmap.shape[1]).permute(0, 2, 3, 1).reshape(B, N, -1)
    return lin("out_proj", att + lce).view(B, Hh, W, C)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("mode", ["full", "decomposed"])
def test_manhattan_attention_matches_the_reference(mode, packed):
    C, heads, Hh, W = 8, 2, 3, 5
    sd = {}
    for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
        sd[n + ".weight"], sd[n + ".bias"] = rand(C, C) / 3, rand(C) / 3
    sd["lepe.conv.weight"], sd["lepe.conv.bias"] = rand(C, 1, 5, 5) / 5, rand(C)
    gammas = [0.6, 0.85]
    sd["stage.decay"] = torch.log(torch.tensor(gammas, dtype=torch.float64))
    layer = retention.ManhattanAttention(C, heads, mode=mode, packed_weights=packed)
    assert layer.packed_weights is packed
    layer.load(sd, "", decay_name="stage.decay")
    assert layer.gammas == pytest.approx(gammas, rel=1e-15)
    x = rand(2, Hh, W, C)
    assert ref.rel_err(layer(x), rmt_reference(sd, x, heads, gammas, mode == "decomposed")) <= 1e-12


@pytest.mark.parametrize("packed", [False, True])
def test_vir_block_matches_the_reference(packed):
    C, heads, T, hidden = 8, 2, 11, 16
    sd = {"norm1.weight": 1 + rand(C) / 5, "norm1.bias": rand(C) / 5,
          "retention.qkv.weight": rand(3 * C, C) / 3, "retention.qkv.bias": rand(3 * C) / 3,
          "retention.out_proj.weight": rand(C, C) / 3, "retention.out_proj.bias": rand(C) / 3,
          "ls1.gamma": rand(C), "norm2.weight": 1 + rand(C) / 5, "norm2.bias": rand(C) / 5,
          "mlp.fc1.weight": rand(hidden, C) / 3, "mlp.fc1.bias": rand(hidden) / 3,
          "mlp.fc2.weight": rand(C, hidden) / 3, "mlp.fc2.bias": rand(C) / 3, "ls2.gamma": rand(C)}
    block = retention.VirBlock(C, heads, mlp_ratio=2.0, packed_weights=packed)
    assert block.packed_weights is packed
    block.load({"blocks.0." + n: t for n, t in sd.items()}, "blocks.0.")
    gammas = retention.linspace_gammas(heads)
    x = rand(T, C)
    h = F.layer_norm(x, (C,), sd["norm1.weight"], sd["norm1.bias"], eps=1e-6)
    qkv = (h @ sd["retention.qkv.weight"].T + sd["retention.qkv.bias"]).view(T, 3, heads, -1)
    o = ref.retention(qkv[None, :, 0] / math.sqrt(C // heads), qkv[None, :, 1], qkv[None, :, 2],
                      gammas)[0].reshape(T, C)
    x1 = x + sd["ls1.gamma"] * (o @ sd["retention.out_proj.weight"].T +
                                sd["retention.out_proj.bias"])
    h = F.layer_norm(x1, (C,), sd["norm2.weight"], sd["norm2.bias"], eps=1e-6)
    m = F.gelu(h @ sd["mlp.fc1.weight"].T + sd["mlp.fc1.bias"]) @ sd["mlp.fc2.weight"].T \
        + sd["mlp.fc2.bias"]
    want = x1 + sd["ls2.gamma"] * m
    for form in ("parallel", "recurrent", "chunkwise"):
        assert ref.rel_err(block(x, form=form, chunk=4), want) <= 1e-12
    mhr = retention.VirRetention(C, heads, packed_weights=packed).load(sd, "retention.")
    assert mhr.packed_weights is packed
    h1 = F.layer_norm(x, (C,), sd["norm1.weight"], sd["norm1.bias"], eps=1e-6)
    want_mhr = o @ sd["retention.out_proj.weight"].T + sd["retention.out_proj.bias"]
    assert ref.rel_err(mhr(h1, form="chunkwise", chunk=3), want_mhr) <= 1e-12


def test_vir_encoder_forms_agree():
    enc = retention.VirEncoder(image_size=32, patch_size=8, embed_dim=16, heads=2, depth=2,
                               seed=5)
    image = np.random.default_rng(0).standard_normal((32, 32, 3))
    base = enc(image)
    assert base.shape == (16,)
    for form, order in (("recurrent", "layer_major"), ("chunkwise", "layer_major"),
                        ("chunkwise", "chunk_major")):
        assert ref.rel_err(enc(image, form=form, chunk=5, order=order), base) <= 1e-12
    assert enc(image, tokens=True).shape == (17, 16)
    # Packed weights (the same seed, so the same parameters) in both orders.
    packed = retention.VirEncoder(image_size=32, patch_size=8, embed_dim=16, heads=2, depth=2,
                                  seed=5, packed_weights=True)
    assert packed.packed_weights and not enc.packed_weights
    for order in ("layer_major", "chunk_major"):
        assert ref.rel_err(packed(image, form="chunkwise", chunk=5, order=order), base) <= 1e-12
    with pytest.raises(ValueError, match="VirEncoder"):
        enc(np.zeros((30, 32, 3)))


def test_masa_masad_numpy():
    B, Hh, W, H, dk, dv = 1, 4, 3, 2, 4, 3
    q, k, v = (np.random.default_rng(i).standard_normal((B, Hh * W, H, d))
               for i, d in enumerate((dk, dk, dv)))
    t = [torch.from_numpy(a) for a in (q, k, v)]
    gammas = [0.5, 0.9]
    for fn, r in ((retention.masa, ref.masa), (retention.masad, ref.masad)):
        out = np.empty((B, Hh * W, H, dv))
        assert fn(q, k, v, gammas, Hh, W, out=out) is out
        assert ref.rel_err(out, r(*t, gammas, Hh, W)) <= 1e-12
    # Training forward + backward through the NumPy API against torch autograd of the reference.
    o, lse = retention.masa_forward_train(q, k, v, gammas, Hh, W)
    g = np.random.default_rng(9).standard_normal(o.shape)
    dq, dk_, dv_ = retention.masa_backward(q, k, v, gammas, Hh, W, o, lse, g)
    tr = [x.clone().requires_grad_() for x in t]
    ref.masa(*tr, gammas, Hh, W).backward(torch.from_numpy(g))
    for a, b in zip((dq, dk_, dv_), tr):
        assert ref.rel_err(a, b.grad) <= 1e-11
    saved = retention.masad_forward_train(q, k, v, gammas, Hh, W)
    grads = retention.masad_backward(q, k, v, gammas, Hh, W, *saved, g)
    tr = [x.clone().requires_grad_() for x in t]
    ref.masad(*tr, gammas, Hh, W).backward(torch.from_numpy(g))
    for a, b in zip(grads, tr):
        assert ref.rel_err(a, b.grad) <= 1e-11
