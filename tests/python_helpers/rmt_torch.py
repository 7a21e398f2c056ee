#!/usr/bin/env python3
"""Writes a random RMT attention layer (the RMT authors' parameter names, docs/math.md §4.5) to
safetensors with scripts/safetensors_write.py, and the outputs of a float64 PyTorch implementation
of the layer written from the equations (docs/math.md §4, SPEC 4), for
tests/test_model_files_vision.cpp.

usage: rmt_torch.py SCRIPTS_DIR OUT_DIR   (exit 77 when torch is missing)
Writes OUT_DIR/rmt_model.safetensors (F64 weights under "layers.1.blocks.0.retention.", the stage's
F32 decay buffer "layers.1.Relpos.decay" = ln gamma_h of a schedule other than the config's, a
buffer "bad.Relpos.decay" holding a positive value, and unrelated tensors of the model) and
OUT_DIR/rmt_expected.safetensors (inputs x_a [2 * 5 * 7, C] (two 5 x 7 images), x_b [1 * 6, C]
(one 1 x 6 image); outputs y_{a,b}_{full,decomposed}_{schedule,buffer}: MaSA / MaSAD with the
config's gammas or the decay buffer's; gammas_buffer [heads] = exp(decay) in F64; config in
__metadata__).
"""
import math
import sys

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    sys.exit(77)

sys.path.insert(0, sys.argv[1])
import safetensors_write as sw  # noqa: E402

OUT = sys.argv[2]
torch.manual_seed(20240611)
f64 = torch.float64

C, HEADS, VALUE_FACTOR = 24, 3, 1
INITIAL_VALUE, HEADS_RANGE = 2.0, 4.0          # the layer's config (rmt schedule)
BUF_INITIAL_VALUE, BUF_HEADS_RANGE = 1.0, 3.0  # the stage whose decay buffer the file holds
CV = VALUE_FACTOR * C
DK, DV = C // HEADS, CV // HEADS
PREFIX = "layers.1.blocks.0.retention."
DECAY = "layers.1.Relpos.decay"


def rmt_gammas(initial_value, heads_range):
    """docs/math.md §1.5 rmt: gamma_h = 1 - 2^-(i + r h / H), in double."""
    return [1.0 - 2.0 ** (-(initial_value + heads_range * h / HEADS)) for h in range(HEADS)]


def theta_shift(x):
    """x [B, N, heads, dk]; the interleaved pair (x_2j, x_2j+1) of token n rotated by n theta_j,
    theta_j = 10000^(-j / (dk/2 - 1)) (docs/math.md §3, position = raster index, §4.1)."""
    _, n, _, dk = x.shape
    half = dk // 2
    j = torch.arange(half, dtype=f64)
    theta = 10000.0 ** (-(j / (half - 1))) if half > 1 else torch.ones(1, dtype=f64)
    angle = torch.arange(n, dtype=f64)[:, None] * theta[None, :]
    c, s = torch.cos(angle)[None, :, None, :], torch.sin(angle)[None, :, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1).reshape(x.shape)


def masa(q, k, v, gamma, height, width):
    """docs/math.md §4.2, one head: softmax_row(Q K^T + (|dy| + |dx|) ln gamma) V.
    q, k [B, N, dk], v [B, N, dv]."""
    n = torch.arange(height * width)
    y, x = n // width, n % width
    dist = ((y[:, None] - y[None, :]).abs() + (x[:, None] - x[None, :]).abs()).to(f64)
    logits = q @ k.transpose(1, 2) + dist * math.log(gamma)
    return torch.softmax(logits, dim=-1) @ v


def masad(q, k, v, gamma, height, width):
    """docs/math.md §4.3, one head: along every grid row (keys of the same y), then along every
    grid column on the row pass's output, both with the same q, k."""
    b = q.shape[0]
    q = q.reshape(b, height, width, -1)
    k = k.reshape(b, height, width, -1)
    v = v.reshape(b, height, width, -1)
    lg = math.log(gamma)
    ix = torch.arange(width)
    dx = (ix[:, None] - ix[None, :]).abs().to(f64)
    row = torch.softmax(torch.einsum("byxd,byzd->byxz", q, k) + dx * lg, dim=-1)
    u = torch.einsum("byxz,byzd->byxd", row, v)
    iy = torch.arange(height)
    dy = (iy[:, None] - iy[None, :]).abs().to(f64)
    # col[b, y, x, y'] = q[b, y, x] . k[b, y', x] + |y - y'| ln gamma
    col = torch.einsum("byxd,bzxd->byxz", q, k) + dy[None, :, None, :] * lg
    col = torch.softmax(col, dim=-1)
    o = torch.einsum("byxz,bzxd->byxd", col, u)
    return o.reshape(b, height * width, -1)


def rmt_attention(w, x, batch, height, width, gammas, mode):
    """docs/math.md §4.1, x [batch * height * width, C] (images in raster order)."""
    n = height * width
    x = x.reshape(batch, n, C)
    q = x @ w["q_proj.weight"].T + w["q_proj.bias"]
    k = (x @ w["k_proj.weight"].T + w["k_proj.bias"]) * DK ** -0.5
    v = x @ w["v_proj.weight"].T + w["v_proj.bias"]
    q = theta_shift(q.reshape(batch, n, HEADS, DK))
    k = theta_shift(k.reshape(batch, n, HEADS, DK))
    vh = v.reshape(batch, n, HEADS, DV)
    attend = masa if mode == "full" else masad
    heads = [attend(q[:, :, h], k[:, :, h], vh[:, :, h], gammas[h], height, width)
             for h in range(HEADS)]
    o = torch.cat(heads, dim=-1)
    # LCE (docs/math.md §4.4): depthwise 5 x 5 cross-correlation, zero padding 2, with bias.
    vmap = v.reshape(batch, height, width, CV).permute(0, 3, 1, 2)
    lce = F.conv2d(vmap, w["lepe.conv.weight"], w["lepe.conv.bias"], padding=2, groups=CV)
    o = o + lce.permute(0, 2, 3, 1).reshape(batch, n, CV)
    y = o @ w["out_proj.weight"].T + w["out_proj.bias"]
    return y.reshape(batch * n, C)


def uniform(shape, fan_in, amp=1.0):
    return (torch.rand(shape, dtype=f64) * 2 - 1) * amp / math.sqrt(fan_in)


weights = {
    "q_proj.weight": uniform((C, C), C, 2.0), "q_proj.bias": uniform((C,), C),
    "k_proj.weight": uniform((C, C), C, 2.0), "k_proj.bias": uniform((C,), C),
    "v_proj.weight": uniform((CV, C), C), "v_proj.bias": uniform((CV,), C),
    "out_proj.weight": uniform((C, CV), CV), "out_proj.bias": uniform((C,), CV),
    "lepe.conv.weight": uniform((CV, 1, 5, 5), 25), "lepe.conv.bias": uniform((CV,), 25),
}
# The stage's decay buffer as RMT's RetNetRelPos2d computes it: ln(1 - 2^(-i - r h / H)) in float32.
decay = torch.log(1 - 2 ** (-BUF_INITIAL_VALUE - BUF_HEADS_RANGE
                            * torch.arange(HEADS, dtype=torch.float32) / HEADS))
gammas_buffer = torch.exp(decay.to(f64))
schedules = {"schedule": rmt_gammas(INITIAL_VALUE, HEADS_RANGE),
             "buffer": [float(g) for g in gammas_buffer]}

others = {  # other tensors of the model's file, which the layer must not need
    "layers.1.Relpos.angle": torch.rand(DK, dtype=torch.float32),
    "layers.1.blocks.0.pos.conv.weight": torch.randn(C, 1, 3, 3, dtype=f64),
    "layers.1.blocks.0.retention_layer_norm.weight": torch.ones(C, dtype=f64),
    "layers.0.Relpos.decay": torch.zeros(HEADS, dtype=torch.float32),
    "bad.Relpos.decay": torch.tensor([-0.5, 0.25, -1.0], dtype=torch.float32),
}
meta = {"embed_dim": str(C), "heads": str(HEADS), "value_factor": str(VALUE_FACTOR),
        "initial_value": repr(INITIAL_VALUE), "heads_range": repr(HEADS_RANGE),
        "prefix": PREFIX, "decay_name": DECAY}
sw.save_file({**others, DECAY: decay, **{PREFIX + n: t for n, t in weights.items()}},
             f"{OUT}/rmt_model.safetensors", metadata=meta)

inputs = {"a": (torch.randn(2 * 5 * 7, C, dtype=f64), 2, 5, 7),
          "b": (torch.randn(1 * 1 * 6, C, dtype=f64), 1, 1, 6)}
expected = {"gammas_buffer": gammas_buffer}
for name, (x, batch, height, width) in inputs.items():
    expected[f"x_{name}"] = x
    for mode in ("full", "decomposed"):
        for which, gammas in schedules.items():
            expected[f"y_{name}_{mode}_{which}"] = rmt_attention(weights, x, batch, height, width,
                                                                 gammas, mode)
sw.save_file(expected, f"{OUT}/rmt_expected.safetensors",
             metadata={**meta, "shape_a": "2 5 7", "shape_b": "1 1 6"})
