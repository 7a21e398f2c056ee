"""retention.torch: the retention kernels as torch.autograd.Functions (CPU tensors).

    o = retention.torch.retention(q, k, v, gammas, form="chunkwise", chunk=0,
                                  normalization="none")
    o.sum().backward()   # q.grad, k.grad, v.grad through the C++ backward passes

q, k [B, T, H, dk] and v [B, T, H, dv] are float32 or float64 CPU tensors, read in place (any
strides with a contiguous last dimension); outputs and gradients are allocated with torch.empty and
written by the kernels, no copies. gammas are constants (no gradient). MaSA / MaSAD take
[B, N, H, D] tensors, N = height * width tokens in raster order.
"""

import torch

from . import _as_numpy, _core, _gammas

__all__ = ["retention", "masa", "masad", "RetentionFunction", "MasaFunction", "MasadFunction"]


def _np(t, name, fn):
    return _as_numpy(t, name, fn)


def _grad_rows(g):
    """An incoming gradient as the kernels read it: rows contiguous. Gradients of a sum or mean
    arrive as expanded tensors (stride 0), which is the one case that needs a copy."""
    if g.dim() > 0 and g.shape[-1] > 1 and g.stride(-1) != 1:
        return g.contiguous()
    return g


def _empty(shape, like):
    return torch.empty(shape, dtype=like.dtype)


class RetentionFunction(torch.autograd.Function):
    """Multi-head retention (docs/math.md §2) forward through multi_head_retention and backward
    through multi_head_retention_backward (§7), in the chosen form and normalisation."""

    @staticmethod
    def forward(ctx, q, k, v, gammas, form, chunk, normalization, detach_score_normalizer,
                threads):
        fn = "retention.torch.retention"
        B, T, H, _ = q.shape
        out = _empty((B, T, H, v.shape[-1]), q)
        _core.retention_into(_np(q, "q", fn), _np(k, "k", fn), _np(v, "v", fn),
                             out.numpy(), list(gammas), form, chunk, normalization, None, None,
                             threads)
        ctx.save_for_backward(q, k, v)
        ctx.options = (list(gammas), form, chunk, normalization, detach_score_normalizer, threads)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        fn = "retention.torch.retention (backward)"
        q, k, v = ctx.saved_tensors
        gammas, form, chunk, normalization, detach, threads = ctx.options
        g = _grad_rows(grad_out)
        dq, dk, dv = _empty(q.shape, q), _empty(k.shape, q), _empty(v.shape, q)
        _core.retention_backward_into(_np(q, "q", fn), _np(k, "k", fn), _np(v, "v", fn),
                                      _np(g, "grad", fn), dq.numpy(), dk.numpy(), dv.numpy(),
                                      gammas, form, chunk, normalization, detach, None, None,
                                      None, threads)
        return dq, dk, dv, None, None, None, None, None, None


def retention(q, k, v, gammas, form="chunkwise", chunk=0, normalization="none", *,
              detach_score_normalizer=False, threads=0):
    """Differentiable multi-head retention: q, k [B, T, H, dk], v [B, T, H, dv] -> o [B, T, H, dv].

    form: "parallel", "recurrent" or "chunkwise" (chunk 0 = automatic); normalization: "none",
    "decay" or "decay_and_score" (detach_score_normalizer=True treats max(|r|, 1) as a constant,
    as torchscale does); gammas: a list of H floats in (0, 1] or a tensor (no gradient).
    """
    fn = "retention.torch.retention"
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{fn}: {name} is {list(t.shape)}, expected [batch, time, heads, dim]")
    if form not in ("parallel", "recurrent", "chunkwise"):
        raise ValueError(f"{fn}: form must be one of 'parallel', 'recurrent', 'chunkwise', "
                         f"got {form!r}")
    if normalization not in ("none", "decay", "decay_and_score"):
        raise ValueError(f"{fn}: normalization must be one of 'none', 'decay', "
                         f"'decay_and_score', got {normalization!r}")
    return RetentionFunction.apply(q, k, v, tuple(_gammas(gammas, fn)), form, int(chunk),
                                   normalization, bool(detach_score_normalizer), int(threads))


class MasaFunction(torch.autograd.Function):
    """MaSA (docs/math.md §4): forward saves the row log-sum-exp, backward (§7) recomputes the
    softmax tile by tile from it."""

    @staticmethod
    def forward(ctx, q, k, v, gammas, height, width, threads):
        fn = "retention.torch.masa"
        B, N, H, _ = q.shape
        out = _empty((B, N, H, v.shape[-1]), q)
        lse = _empty((B, N, H), q)
        _core.masa_forward_train_into(_np(q, "q", fn), _np(k, "k", fn), _np(v, "v", fn),
                                      out.numpy(), lse.numpy(), list(gammas), height, width,
                                      threads)
        ctx.save_for_backward(q, k, v, out)
        ctx.lse = lse
        ctx.options = (list(gammas), height, width, threads)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        fn = "retention.torch.masa (backward)"
        q, k, v, out = ctx.saved_tensors
        gammas, height, width, threads = ctx.options
        g = _grad_rows(grad_out)
        dq, dk, dv = _empty(q.shape, q), _empty(k.shape, q), _empty(v.shape, q)
        _core.masa_backward_into(_np(q, "q", fn), _np(k, "k", fn), _np(v, "v", fn),
                                 _np(out, "out", fn), ctx.lse.numpy(), _np(g, "grad", fn),
                                 dq.numpy(), dk.numpy(), dv.numpy(), gammas, height, width,
                                 threads)
        return dq, dk, dv, None, None, None, None


class MasadFunction(torch.autograd.Function):
    """MaSAD (docs/math.md §4): forward saves the row pass's output u and both passes'
    log-sum-exp; backward (§7) runs the column pass's backward, then the row pass's."""

    @staticmethod
    def forward(ctx, q, k, v, gammas, height, width, threads):
        fn = "retention.torch.masad"
        B, N, H, _ = q.shape
        dv = v.shape[-1]
        out, u = _empty((B, N, H, dv), q), _empty((B, N, H, dv), q)
        row_lse, column_lse = _empty((B, N, H), q), _empty((B, N, H), q)
        _core.masad_forward_train_into(_np(q, "q", fn), _np(k, "k", fn), _np(v, "v", fn),
                                       out.numpy(), u.numpy(), row_lse.numpy(),
                                       column_lse.numpy(), list(gammas), height, width, threads)
        ctx.save_for_backward(q, k, v, out)
        ctx.saved = (u, row_lse, column_lse)
        ctx.options = (list(gammas), height, width, threads)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        fn = "retention.torch.masad (backward)"
        q, k, v, out = ctx.saved_tensors
        u, row_lse, column_lse = ctx.saved
        gammas, height, width, threads = ctx.options
        g = _grad_rows(grad_out)
        dq, dk, dv = _empty(q.shape, q), _empty(k.shape, q), _empty(v.shape, q)
        _core.masad_backward_into(_np(q, "q", fn), _np(k, "k", fn), _np(v, "v", fn),
                                  _np(out, "out", fn), u.numpy(), row_lse.numpy(),
                                  column_lse.numpy(), _np(g, "grad", fn), dq.numpy(), dk.numpy(),
                                  dv.numpy(), gammas, height, width, threads)
        return dq, dk, dv, None, None, None, None


def _grid_args(fn, q, k, v, height, width):
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{fn}: {name} is {list(t.shape)}, expected [batch, height * width, "
                             "heads, dim]")
    if int(height) * int(width) != q.shape[1]:
        raise ValueError(f"{fn}: q has {q.shape[1]} tokens, expected height * width = "
                         f"{int(height)} * {int(width)}")


def masa(q, k, v, gammas, height, width, *, threads=0):
    """Differentiable MaSA: per head softmax_row(q k^T + ln D) v with the Manhattan decay of
    gammas[h] on a height x width grid; q, k [B, N, H, dk], v [B, N, H, dv] -> [B, N, H, dv]."""
    fn = "retention.torch.masa"
    _grid_args(fn, q, k, v, height, width)
    return MasaFunction.apply(q, k, v, tuple(_gammas(gammas, fn)), int(height), int(width),
                              int(threads))


def masad(q, k, v, gammas, height, width, *, threads=0):
    """Differentiable MaSAD (rows, then columns); operands as masa."""
    fn = "retention.torch.masad"
    _grid_args(fn, q, k, v, height, width)
    return MasadFunction.apply(q, k, v, tuple(_gammas(gammas, fn)), int(height), int(width),
                               int(threads))
