#!/usr/bin/env python3
"""Writes a random RetNet MSR layer (torchscale's parameter names) to safetensors with
scripts/safetensors_write.py, and the outputs of a float64 PyTorch implementation of the layer
written from the equations (docs/math.md §3, SPEC 2 and 3), for tests/test_model_files.cpp.

usage: msr_torch.py SCRIPTS_DIR OUT_DIR   (exit 77 when torch is missing)
Writes OUT_DIR/msr_model.safetensors (F64 weights under "layers.1.retention."),
OUT_DIR/msr_model_bf16.safetensors (the same weights as BF16) and OUT_DIR/msr_expected.safetensors
(inputs x_a [Ta, d], x_b [Tb, d]; outputs y_a, y_b of the F64 weights and y_a_bf16 of the
BF16-rounded weights, all F64; config in __metadata__).
"""
import math
import sys

try:
    import torch
except ImportError:
    sys.exit(77)

sys.path.insert(0, sys.argv[1])
import safetensors_write as sw  # noqa: E402

OUT = sys.argv[2]
torch.manual_seed(20240607)
f64 = torch.float64

D, VALUE_DIM, HEADS, EPS = 16, 32, 4, 1e-6
DK, DV = D // HEADS, VALUE_DIM // HEADS
PREFIX = "layers.1.retention."


def theta_shift(x, first_position):
    """x [T, H, dk]; interleaved pairs (x_2j, x_2j+1) rotated by p * theta_j at position p."""
    t, _, dk = x.shape
    half = dk // 2
    j = torch.arange(half, dtype=f64)
    theta = 10000.0 ** (-(j / (half - 1))) if half > 1 else torch.ones(1, dtype=f64)
    pos = torch.arange(first_position, first_position + t, dtype=f64)
    angle = pos[:, None] * theta[None, :]
    c, s = torch.cos(angle)[:, None, :], torch.sin(angle)[:, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1).reshape(x.shape)


def retention_head(q, k, v, gamma):
    """SPEC 2 with decay_and_score: row n / sqrt(sum_{i<=n} gamma^i) / max(|r_n|, 1),
    r_n = sum_m gamma^(n-m) (q_n . k_m) / sqrt(sum_{i<=n} gamma^i)."""
    t = q.shape[0]
    n = torch.arange(t, dtype=f64)
    dist = n[:, None] - n[None, :]
    log_gamma = math.log1p(gamma - 1.0)
    decay = torch.where(dist >= 0, torch.exp(dist.clamp(min=0) * log_gamma),
                        torch.zeros((), dtype=f64))
    scores = (q @ k.T) * decay
    decay_sum = torch.cumsum(torch.exp(n * log_gamma), 0)
    root = torch.sqrt(decay_sum)[:, None]
    r = scores.sum(-1, keepdim=True) / root
    return (scores @ v) / root / torch.clamp(r.abs(), min=1.0)


def msr(weights, x):
    """torchscale MultiScaleRetention, x [T, d] -> [T, d], positions 0..T-1."""
    t = x.shape[0]
    q = (x @ weights["q_proj.weight"].T).reshape(t, HEADS, DK)
    k = (x @ weights["k_proj.weight"].T).reshape(t, HEADS, DK) * DK ** -0.5
    v = (x @ weights["v_proj.weight"].T).reshape(t, HEADS, DV)
    g = x @ weights["g_proj.weight"].T
    q, k = theta_shift(q, 0), theta_shift(k, 0)
    heads = []
    for h in range(HEADS):
        gamma = 1.0 - 2.0 ** (-5 - h)
        o = retention_head(q[:, h], k[:, h], v[:, h], gamma)
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + EPS)  # RMSNorm, no weight
        heads.append(o)
    o = torch.cat(heads, dim=-1)
    return (torch.nn.functional.silu(g) * o) @ weights["out_proj.weight"].T


shapes = {"q_proj.weight": (D, D), "k_proj.weight": (D, D), "v_proj.weight": (VALUE_DIM, D),
          "g_proj.weight": (VALUE_DIM, D), "out_proj.weight": (D, VALUE_DIM)}
weights = {n: (torch.rand(s, dtype=f64) * 2 - 1) / math.sqrt(s[1]) for n, s in shapes.items()}
bf16 = {n: w.to(torch.bfloat16) for n, w in weights.items()}
rounded = {n: w.to(f64) for n, w in bf16.items()}

x_a = torch.randn(23, D, dtype=f64)
x_b = torch.randn(9, D, dtype=f64)
meta = {"embed_dim": str(D), "value_dim": str(VALUE_DIM), "heads": str(HEADS), "prefix": PREFIX}
# An unrelated tensor in the file: loading must pick its own names out of a whole model's file.
other = {"embed_tokens.weight": torch.randn(5, D, dtype=f64)}
sw.save_file({**other, **{PREFIX + n: w for n, w in weights.items()}},
             f"{OUT}/msr_model.safetensors", metadata=meta)
sw.save_file({PREFIX + n: w for n, w in bf16.items()}, f"{OUT}/msr_model_bf16.safetensors",
             metadata=meta)
sw.save_file({"x_a": x_a, "x_b": x_b, "y_a": msr(weights, x_a), "y_b": msr(weights, x_b),
              "y_a_bf16": msr(rounded, x_a)}, f"{OUT}/msr_expected.safetensors", metadata=meta)
