#!/usr/bin/env python3
"""Writes a random ViR encoder (the ViR authors' parameter names, docs/math.md §5) to safetensors
with scripts/safetensors_write.py, and the outputs of a float64 PyTorch implementation written from
the equations (docs/math.md §5, §2; SPEC 5), for tests/test_model_files_vision.cpp.

usage: vir_torch.py SCRIPTS_DIR OUT_DIR   (exit 77 when torch is missing)
Writes OUT_DIR/vir_model.safetensors (F64 encoder weights under "backbone.", plus an unrelated
classifier head) and OUT_DIR/vir_expected.safetensors:
  x_ret [13, C] -> y_ret: MHR of block 1; x_ret_b [6, C] -> y_ret_b (a second sequence)
  x_blk [11, C] -> y_blk: block 1
  image_train [8, 8, 3] (HWC, the training resolution) -> tokens_train [17, C] (all tokens after
    the final norm, class token last), feature_train [C]
  image_other [6, 10, 3] (a 3 x 5 patch grid: pos_embed resampled bilinearly) -> tokens_other
    [16, C], feature_other [C]
  gammas [heads]; config in __metadata__.
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
torch.manual_seed(20240612)
f64 = torch.float64

IMAGE, PATCH, IN_CH, C, HEADS, DEPTH, MLP_RATIO, EPS = 8, 2, 3, 24, 3, 2, 2.5, 1e-6
HIDDEN = int(C * MLP_RATIO)
HD = C // HEADS
G = IMAGE // PATCH
PREFIX = "backbone."

# docs/math.md §1.5 linspace: gamma_h = 1 - exp(ln a + (ln b - ln a) h / (H - 1)),
# a = 1/32, b = 1/512.
LN_A, LN_B = math.log(1 / 32), math.log(1 / 512)
GAMMAS = [1.0 - math.exp(LN_A + (LN_B - LN_A) * h / (HEADS - 1)) for h in range(HEADS)]


def linear(x, w, name):
    return x @ w[name + ".weight"].T + w[name + ".bias"]


def layer_norm(x, w, name):
    """Affine LayerNorm over the last axis, biased variance, eps EPS."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + EPS) * w[name + ".weight"] + w[name + ".bias"]


def gelu(x):
    """Exact GELU: x (1 + erf(x / sqrt 2)) / 2."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def mhr(w, p, x):
    """docs/math.md §5 MHR on x [T, C]: qkv split (q | k | v) x heads x head_dim, q scaled by
    head_dim^-1/2, per head o_n = sum_{m<=n} gamma^(n-m) (q_n . k_m) v_m, then out_proj."""
    t = x.shape[0]
    qkv = linear(x, w, p + "qkv")
    q = qkv[:, :C].reshape(t, HEADS, HD) * HD ** -0.5
    k = qkv[:, C:2 * C].reshape(t, HEADS, HD)
    v = qkv[:, 2 * C:].reshape(t, HEADS, HD)
    n = torch.arange(t, dtype=f64)
    dist = n[:, None] - n[None, :]
    heads = []
    for h in range(HEADS):
        decay = torch.where(dist >= 0, torch.exp(dist.clamp(min=0) * math.log(GAMMAS[h])),
                            torch.zeros((), dtype=f64))
        heads.append(((q[:, h] @ k[:, h].T) * decay) @ v[:, h])
    return linear(torch.cat(heads, dim=-1), w, p + "out_proj")


def block(w, p, x):
    """docs/math.md §5 pre-norm block."""
    x = x + w[p + "ls1.gamma"] * mhr(w, p + "retention.", layer_norm(x, w, p + "norm1"))
    h = gelu(linear(layer_norm(x, w, p + "norm2"), w, p + "mlp.fc1"))
    return x + w[p + "ls2.gamma"] * linear(h, w, p + "mlp.fc2")


def encoder(w, image):
    """docs/math.md §5 encoder on image [1, IN_CH, H, W] -> all tokens after the final norm."""
    patches = F.conv2d(image, w["patch_embed.proj.weight"], w["patch_embed.proj.bias"],
                       stride=PATCH)  # [1, C, gh, gw]
    gh, gw = patches.shape[2:]
    x = patches.flatten(2).transpose(1, 2)[0]  # [gh * gw, C], raster order
    pos = w["pos_embed"].reshape(1, G, G, C).permute(0, 3, 1, 2)
    if (gh, gw) != (G, G):
        pos = F.interpolate(pos, size=(gh, gw), mode="bilinear", align_corners=False)
    x = x + pos.flatten(2).transpose(1, 2)[0]
    x = torch.cat([x, w["cls_token"].reshape(1, C)], dim=0)  # class token LAST, no position
    for d in range(DEPTH):
        x = block(w, f"blocks.{d}.", x)
    return layer_norm(x, w, "norm")


def uniform(shape, amp):
    return (torch.rand(shape, dtype=f64) * 2 - 1) * amp


w = {"patch_embed.proj.weight": uniform((C, IN_CH, PATCH, PATCH),
                                        1.5 / math.sqrt(IN_CH * PATCH ** 2)),
     "patch_embed.proj.bias": uniform((C,), 0.3),
     "pos_embed": uniform((1, G * G, C), 0.5),
     "cls_token": uniform((1, 1, C), 0.5),
     "norm.weight": 1 + uniform((C,), 0.3), "norm.bias": uniform((C,), 0.3)}
for d in range(DEPTH):
    p = f"blocks.{d}."
    w.update({p + "norm1.weight": 1 + uniform((C,), 0.3), p + "norm1.bias": uniform((C,), 0.3),
              p + "retention.qkv.weight": uniform((3 * C, C), 1.5 / math.sqrt(C)),
              p + "retention.qkv.bias": uniform((3 * C,), 0.3),
              p + "retention.out_proj.weight": uniform((C, C), 1.5 / math.sqrt(C)),
              p + "retention.out_proj.bias": uniform((C,), 0.3),
              p + "ls1.gamma": 1 + uniform((C,), 0.5),
              p + "norm2.weight": 1 + uniform((C,), 0.3), p + "norm2.bias": uniform((C,), 0.3),
              p + "mlp.fc1.weight": uniform((HIDDEN, C), 1.5 / math.sqrt(C)),
              p + "mlp.fc1.bias": uniform((HIDDEN,), 0.3),
              p + "mlp.fc2.weight": uniform((C, HIDDEN), 1.5 / math.sqrt(HIDDEN)),
              p + "mlp.fc2.bias": uniform((C,), 0.3),
              p + "ls2.gamma": 1 + uniform((C,), 0.5)})

meta = {"image_size": str(IMAGE), "patch_size": str(PATCH), "in_channels": str(IN_CH),
        "embed_dim": str(C), "heads": str(HEADS), "depth": str(DEPTH),
        "mlp_ratio": repr(MLP_RATIO), "layer_norm_eps": repr(EPS), "prefix": PREFIX}
head = {"head.weight": torch.randn(10, C, dtype=f64), "head.bias": torch.randn(10, dtype=f64)}
sw.save_file({**head, **{PREFIX + n: t for n, t in w.items()}}, f"{OUT}/vir_model.safetensors",
             metadata=meta)

x_ret, x_ret_b, x_blk = (torch.randn(t, C, dtype=f64) for t in (13, 6, 11))
image_train = torch.rand(1, IN_CH, IMAGE, IMAGE, dtype=f64)
image_other = torch.rand(1, IN_CH, 6, 10, dtype=f64)
tokens_train, tokens_other = encoder(w, image_train), encoder(w, image_other)
sw.save_file({"x_ret": x_ret, "y_ret": mhr(w, "blocks.1.retention.", x_ret),
              "x_ret_b": x_ret_b, "y_ret_b": mhr(w, "blocks.1.retention.", x_ret_b),
              "x_blk": x_blk, "y_blk": block(w, "blocks.1.", x_blk),
              "image_train": image_train[0].permute(1, 2, 0).contiguous(),
              "tokens_train": tokens_train, "feature_train": tokens_train[-1],
              "image_other": image_other[0].permute(1, 2, 0).contiguous(),
              "tokens_other": tokens_other, "feature_other": tokens_other[-1],
              "gammas": torch.tensor(GAMMAS, dtype=f64)},
             f"{OUT}/vir_expected.safetensors", metadata=meta)
