"""Pure-PyTorch references written straight from the equations (docs/math.md §2, §4): dense
masks, explicit sums, float64. Differentiable through torch's own autograd."""

import math

import torch


def decay_sum(gamma, p):
    """sum_{i=0}^{p} gamma^i for a tensor of positions p."""
    p = p.to(torch.float64)
    if gamma == 1.0:
        return p + 1.0
    return (1.0 - gamma ** (p + 1.0)) / (1.0 - gamma)


def retention(q, k, v, gammas, normalization="none", S0=None, z0=None, position=0):
    """o[b, n, h] = sum_{m <= n} gamma_h^(n-m) (q_n . k_m) v_m + gamma_h^(n+1) q_n S0, rescaled
    per docs/math.md §2: `decay` divides row n by sqrt(sum_{i<=p} gamma^i), p = position + n;
    `decay_and_score` then by max(|r_n|, 1), r_n the decay-normalised signed score row sum
    including the carried-in z0. q, k [B, T, H, dk], v [B, T, H, dv]; S0 [B, H, dk, dv],
    z0 [B, H, dk] optional."""
    B, T, H, _ = q.shape
    n = torch.arange(T, dtype=torch.float64)
    outs = []
    for h in range(H):
        g = float(gammas[h])
        diff = n[:, None] - n[None, :]
        D = torch.where(diff >= 0, g ** diff.clamp(min=0), torch.zeros(()).double())
        qh, kh, vh = q[:, :, h], k[:, :, h], v[:, :, h]
        scores = (qh @ kh.transpose(1, 2)) * D.to(q.dtype)
        u = scores @ vh
        r = scores.sum(-1)
        if S0 is not None:
            carry = (g ** (n + 1.0)).to(q.dtype)
            u = u + carry[None, :, None] * (qh @ S0[:, h])
            r = r + carry[None, :] * (qh @ z0[:, h, :, None])[..., 0]
        if normalization in ("decay", "decay_and_score"):
            c = decay_sum(g, n + position).rsqrt().to(q.dtype)
            u = u * c[None, :, None]
            r = r * c[None, :]
        if normalization == "decay_and_score":
            u = u / torch.clamp(r.abs(), min=1.0)[..., None]
        outs.append(u)
    return torch.stack(outs, dim=2)


def final_state(k, v, gammas, S0=None, z0=None):
    """S_{T-1} = sum_m gamma^(T-1-m) k_m^T v_m (+ gamma^T S0), z likewise: [B, H, dk, dv], [B, H, dk]."""
    B, T, H, _ = k.shape
    w = torch.stack([float(gammas[h]) ** torch.arange(T - 1, -1, -1, dtype=torch.float64)
                     for h in range(H)], dim=1).to(k.dtype)  # [T, H]
    S = torch.einsum("bthi,bthj,th->bhij", k, v, w)
    z = torch.einsum("bthi,th->bhi", k, w)
    if S0 is not None:
        gT = torch.tensor([float(gammas[h]) ** T for h in range(H)], dtype=k.dtype)
        S = S + gT[None, :, None, None] * S0
        z = z + gT[None, :, None] * z0
    return S, z


def manhattan_log_decay(gamma, height, width):
    """ln D [N, N] of the Manhattan mask on a height x width grid, raster order."""
    y = torch.arange(height).repeat_interleave(width)
    x = torch.arange(width).repeat(height)
    dist = (y[:, None] - y[None, :]).abs() + (x[:, None] - x[None, :]).abs()
    return dist.to(torch.float64) * math.log(gamma)


def masa(q, k, v, gammas, height, width):
    """softmax_row(q k^T + ln D) v per head; q, k [B, N, H, dk], v [B, N, H, dv]."""
    outs = []
    for h in range(q.shape[2]):
        L = manhattan_log_decay(float(gammas[h]), height, width).to(q.dtype)
        logits = q[:, :, h] @ k[:, :, h].transpose(1, 2) + L
        outs.append(torch.softmax(logits, dim=-1) @ v[:, :, h])
    return torch.stack(outs, dim=2)


def masad(q, k, v, gammas, height, width):
    """Row pass (softmax over x' within row y) then column pass (over y' within column x)."""
    B, N, H, dk = q.shape
    dv = v.shape[-1]
    qg = q.reshape(B, height, width, H, dk)
    kg = k.reshape(B, height, width, H, dk)
    vg = v.reshape(B, height, width, H, dv)
    outs = []
    for h in range(H):
        lg = math.log(float(gammas[h]))
        xs = torch.arange(width, dtype=torch.float64)
        ys = torch.arange(height, dtype=torch.float64)
        Lx = ((xs[:, None] - xs[None, :]).abs() * lg).to(q.dtype)
        Ly = ((ys[:, None] - ys[None, :]).abs() * lg).to(q.dtype)
        qh, kh, vh = qg[..., h, :], kg[..., h, :], vg[..., h, :]  # [B, Hh, W, d]
        row = torch.einsum("byxd,byzd->byxz", qh, kh) + Lx
        u = torch.einsum("byxz,byzd->byxd", torch.softmax(row, -1), vh)
        col = torch.einsum("byxd,bzxd->bxyz", qh, kh) + Ly
        o = torch.einsum("bxyz,bzxd->byxd", torch.softmax(col, -1), u)
        outs.append(o.reshape(B, N, dv))
    return torch.stack(outs, dim=2)


def rel_err(a, b):
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm())
