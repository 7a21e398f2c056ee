#!/usr/bin/env python3
"""Train a tiny RetNet language model whose retention runs in the C++ kernels (retention.torch),
side by side with the same model whose retention is plain PyTorch, then generate text from the
trained weights with the recurrent form.

    PYTHONPATH=build/python python3 examples/04_train.py [--steps 300] [--dtype float32]

In float64 (the default) the two loss curves agree to about 1e-14 relative. In float32 the two
runs round differently and training amplifies the difference: the curves drift apart by a few per
cent over a few hundred steps, as two float32 runs of any model with reordered sums do.

The model: character embedding, 2 layers of [RMSNorm -> multi-scale retention (docs/math.md §3:
q, k, v, g projections, theta shift, per-head retention with the decay_and_score normalisation,
per-head RMSNorm, swish gate, output projection) -> RMSNorm -> FFN], final RMSNorm, tied output
head. Both runs start from the same weights and see the same batches, so their loss curves agree
to rounding; the text is a license that ships with Debian.
"""

import argparse
import copy
import math
import pathlib
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import retention
import retention.torch as rt

TEXT = pathlib.Path("/usr/share/common-licenses/GPL-3")


# ---- retention in plain PyTorch (the parallel form, docs/math.md §2) -------------------------

def torch_retention(q, k, v, gammas, normalization="decay_and_score"):
    """q, k [B, T, H, dk], v [B, T, H, dv] -> [B, T, H, dv]: the decay mask D[n, m] =
    gamma^(n-m) (m <= n), row n of D scaled by 1/sqrt(sum_{i<=n} gamma^i) for `decay`, then each
    row by 1/max(|r_n|, 1), r_n the row sum of the scaled scores, for `decay_and_score`."""
    T = q.shape[1]
    n = torch.arange(T, dtype=torch.float64)
    log_g = torch.log(torch.tensor(gammas, dtype=torch.float64))  # [H]
    diff = n[:, None] - n[None, :]
    D = torch.where(diff >= 0, torch.exp(diff.clamp(min=0)[None] * log_g[:, None, None]),
                    torch.zeros((), dtype=torch.float64))  # [H, T, T]
    if normalization in ("decay", "decay_and_score"):
        D = D / D.sum(-1, keepdim=True).sqrt()  # sum_m D[n, m] = sum_{i<=n} gamma^i
    scores = torch.einsum("bthd,bshd->bhts", q, k) * D.to(q.dtype)
    if normalization == "decay_and_score":
        scores = scores / scores.sum(-1, keepdim=True).abs().clamp(min=1.0)
    return torch.einsum("bhts,bshd->bthd", scores, v)


def theta_shift(x, position):
    """Rotates interleaved pairs (x_2j, x_2j+1) of x [B, T, H, dk] at positions position..+T-1 by
    p * theta_j, theta_j = 10000^(-j / (dk/2 - 1)) (docs/math.md §3)."""
    B, T, H, dk = x.shape
    half = dk // 2
    j = torch.arange(half, dtype=torch.float64)
    theta = 10000.0 ** (-j / max(half - 1, 1))
    angle = torch.arange(position, position + T, dtype=torch.float64)[:, None] * theta  # [T, dk/2]
    cos, sin = angle.cos().to(x.dtype)[None, :, None], angle.sin().to(x.dtype)[None, :, None]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).reshape(B, T, H, dk)


def rms_norm(x, eps=1e-6):
    return x * (x.pow(2).mean(-1, keepdim=True) + eps).rsqrt()


# ---- the model ------------------------------------------------------------------------------

class MultiScaleRetention(nn.Module):
    """torchscale's layout: q_proj, k_proj, v_proj, g_proj, out_proj, no biases."""

    def __init__(self, d, heads, value_dim, use_kernels):
        super().__init__()
        self.heads, self.dk, self.dv = heads, d // heads, value_dim // heads
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, value_dim, bias=False)
        self.g_proj = nn.Linear(d, value_dim, bias=False)
        self.out_proj = nn.Linear(value_dim, d, bias=False)
        self.gammas = retention.retnet_gammas(heads)
        self.use_kernels = use_kernels

    def project(self, x, position):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.dk)
        k = self.k_proj(x).view(B, T, self.heads, self.dk) / math.sqrt(self.dk)
        v = self.v_proj(x).view(B, T, self.heads, self.dv)
        return theta_shift(q, position), theta_shift(k, position), v

    def finish(self, x, o):
        B, T = o.shape[:2]
        return self.out_proj(F.silu(self.g_proj(x)) * rms_norm(o).reshape(B, T, -1))

    def forward(self, x):
        q, k, v = self.project(x, 0)
        if self.use_kernels:
            o = rt.retention(q, k, v, self.gammas, "chunkwise", normalization="decay_and_score")
        else:
            o = torch_retention(q, k, v, self.gammas)
        return self.finish(x, o)


class RetNetLM(nn.Module):
    def __init__(self, vocab, d=64, heads=4, layers=2, ffn=128, use_kernels=True):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        nn.init.normal_(self.embed.weight, std=d ** -0.5)  # tied head: logits of order 1
        self.msr = nn.ModuleList(MultiScaleRetention(d, heads, 2 * d, use_kernels)
                                 for _ in range(layers))
        self.ffn = nn.ModuleList(nn.Sequential(nn.Linear(d, ffn), nn.GELU(), nn.Linear(ffn, d))
                                 for _ in range(layers))

    def set_kernels(self, on):
        for m in self.msr:
            m.use_kernels = on

    def forward(self, tokens):
        x = self.embed(tokens)
        for msr, ffn in zip(self.msr, self.ffn):
            x = x + msr(rms_norm(x))
            x = x + ffn(rms_norm(x))
        return rms_norm(x) @ self.embed.weight.T

    @torch.no_grad()
    def generate(self, prompt, count, temperature=0.7, seed=0):
        """Prefill the prompt [T] in the chunkwise form, then decode `count` tokens one step at a
        time with the recurrent form (retention_step); each layer keeps one RetentionState.
        temperature 0 = greedy."""
        gen = torch.Generator().manual_seed(seed)
        tokens = prompt[None]
        states = []
        x = self.embed(tokens)
        for msr, ffn in zip(self.msr, self.ffn):
            h = rms_norm(x)
            q, k, v = msr.project(h, 0)
            o, st = retention.retention(q, k, v, msr.gammas, "chunkwise",
                                        normalization="decay_and_score", return_state=True)
            states.append(st)
            x = x + msr.finish(h, o)
            x = x + ffn(rms_norm(x))
        logits = rms_norm(x[:, -1]) @ self.embed.weight.T
        out = []
        position = prompt.shape[0]
        for _ in range(count):
            if temperature == 0:
                nxt = logits[0].argmax(-1, keepdim=True)
            else:
                nxt = torch.multinomial(torch.softmax(logits[0] / temperature, -1), 1,
                                        generator=gen)
            out.append(int(nxt))
            x = self.embed(nxt)[None]  # [1, 1, d]
            for msr, ffn, st in zip(self.msr, self.ffn, states):
                h = rms_norm(x)
                q, k, v = msr.project(h, position)
                o = retention.retention_step(q[:, 0], k[:, 0], v[:, 0], msr.gammas, st,
                                             "decay_and_score")
                x = x + msr.finish(h, o[:, None])
                x = x + ffn(rms_norm(x))
            logits = rms_norm(x[:, -1]) @ self.embed.weight.T
            position += 1
        return out


# ---- training -------------------------------------------------------------------------------

def load_text():
    text = TEXT.read_text(encoding="utf-8")
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    return torch.tensor([index[c] for c in text], dtype=torch.long), chars


def batches(data, steps, batch, length, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, data.numel() - length - 1, (batch,), generator=gen)
        rows = torch.stack([data[s:s + length + 1] for s in start.tolist()])
        yield rows[:, :-1], rows[:, 1:]


def train(model, data, steps, batch, length, lr=3e-3, seed=1):
    """Adam on next-character cross entropy; returns the loss per step and seconds per step."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    start = time.perf_counter()
    for x, y in batches(data, steps, batch, length, seed):
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, (time.perf_counter() - start) / max(steps, 1)


def side_by_side(steps=300, batch=16, length=128, dtype=torch.float32, seed=0, d=64, heads=4,
                 ffn=128):
    """Two copies of one model, retention through the kernels and through plain PyTorch, trained
    on the same batches. Returns (kernel model, kernel losses, torch losses, kernel s/step, torch
    s/step, vocabulary)."""
    data, chars = load_text()
    torch.manual_seed(seed)
    ours = RetNetLM(len(chars), d=d, heads=heads, ffn=ffn, use_kernels=True).to(dtype)
    plain = copy.deepcopy(ours)
    plain.set_kernels(False)
    ours_losses, ours_time = train(ours, data, steps, batch, length)
    plain_losses, plain_time = train(plain, data, steps, batch, length)
    return ours, ours_losses, plain_losses, ours_time, plain_time, chars


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    p.add_argument("--generate", type=int, default=300)
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    model, ours, plain, t_ours, t_plain, chars = side_by_side(args.steps, args.batch, args.length,
                                                              dtype)
    print(f"{'step':>5} {'loss (retention.torch)':>24} {'loss (plain PyTorch)':>22} "
          f"{'relative difference':>20}")
    for i in range(0, len(ours), max(1, len(ours) // 20)):
        print(f"{i:5d} {ours[i]:24.6f} {plain[i]:22.6f} {abs(ours[i] - plain[i]) / plain[i]:20.2e}")
    print(f"{len(ours) - 1:5d} {ours[-1]:24.6f} {plain[-1]:22.6f} "
          f"{abs(ours[-1] - plain[-1]) / plain[-1]:20.2e}")
    print(f"time per step: retention.torch {1e3 * t_ours:.1f} ms, plain PyTorch "
          f"{1e3 * t_plain:.1f} ms ({args.dtype}, batch {args.batch}, length {args.length})")
    prompt_text = "This License "
    index = {c: i for i, c in enumerate(chars)}
    prompt = torch.tensor([index[c] for c in prompt_text], dtype=torch.long)
    out = model.generate(prompt, args.generate)
    print("\ngenerated (chunkwise prefill, then recurrent steps):")
    print(prompt_text + "".join(chars[i] for i in out))


if __name__ == "__main__":
    main()
