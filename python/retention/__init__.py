"""retention: RetNet retention, RMT's MaSA/MaSAD and ViR kernels from the C++ library.

Every function takes NumPy arrays or PyTorch CPU tensors (float32 or float64) in the
[batch, time, heads, dim] layout, reads them in place (any non-negative strides with a contiguous
last dimension), writes its outputs into arrays or tensors allocated here (or passed as ``out=``)
and returns them as the type of its first input. The GIL is released while a kernel runs.
Autograd lives in :mod:`retention.torch`.
"""

import numpy as _np

from . import _core
from ._core import (  # noqa: F401  (re-exported)
    ParameterMap,
    RetentionState,
    ShapeError,
    linspace_gammas,
    recommended_chunk,
    retnet_gammas,
    rmt_gammas,
)

__all__ = [
    "ShapeError", "RetentionState", "ParameterMap", "retnet_gammas", "linspace_gammas",
    "rmt_gammas", "recommended_chunk", "retention", "retention_step", "retention_backward",
    "masa", "masad", "masa_forward_train", "masa_backward", "masad_forward_train",
    "masad_backward", "parameters", "MultiScaleRetention", "ManhattanAttention",
    "VirRetention", "VirBlock", "VirEncoder",
]

FORMS = ("parallel", "recurrent", "chunkwise")
NORMALIZATIONS = ("none", "decay", "decay_and_score")


# ---- arrays and tensors ---------------------------------------------------------------------

def _is_torch(x):
    return type(x).__module__.split(".")[0] == "torch"


def _as_numpy(x, name, fn):
    """A NumPy view of x (an ndarray as is, a CPU tensor through .numpy(): no copy)."""
    if isinstance(x, _np.ndarray):
        return x
    if _is_torch(x):
        import torch

        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a tensor or an array, got {type(x).__name__}")
        if x.device.type != "cpu":
            raise ValueError(f"{fn}: {name} is on {x.device}; the kernels run on CPU tensors "
                             "(move it with .cpu())")
        if x.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{fn}: {name} has dtype {x.dtype}, expected torch.float32 or "
                            "torch.float64")
        if x.is_sparse or x.layout != torch.strided:
            raise ValueError(f"{fn}: {name} must be a dense (strided) tensor")
        return x.detach().numpy()
    raise TypeError(f"{fn}: {name} must be a numpy.ndarray or a torch CPU tensor, "
                    f"got {type(x).__name__}")


def _empty_like_input(proto, shape):
    """A new uninitialised array (or tensor, if proto is one) of proto's dtype."""
    if _is_torch(proto):
        import torch

        return torch.empty(shape, dtype=proto.dtype)
    return _np.empty(shape, dtype=proto.dtype)


def _output(proto, shape, given, name, fn):
    """(the object to return, its NumPy view): `given` if set, else a fresh one."""
    if given is None:
        given = _empty_like_input(proto, shape)
    view = _as_numpy(given, name, fn)
    if tuple(view.shape) != tuple(shape):
        raise ValueError(f"{fn}: {name} is {list(view.shape)}, expected {list(shape)}")
    return given, view


def _gammas(gammas, fn):
    if _is_torch(gammas):
        gammas = gammas.detach().cpu().tolist()
    elif isinstance(gammas, _np.ndarray):
        gammas = gammas.tolist()
    try:
        return [float(g) for g in gammas]
    except TypeError:
        raise TypeError(f"{fn}: gammas must be a sequence of floats (one per head)") from None


def _state(s, name, fn):
    if s is not None and not isinstance(s, RetentionState):
        raise TypeError(f"{fn}: {name} must be a retention.RetentionState or None, "
                        f"got {type(s).__name__}")
    return s


def _dims(a, name, fn, ndim=4):
    if a.ndim != ndim:
        raise ValueError(f"{fn}: {name} is {list(a.shape)}, expected {ndim} dimensions "
                         "[batch, time, heads, dim]")
    return a.shape


# ---- retention ------------------------------------------------------------------------------

def retention(q, k, v, gammas, form="chunkwise", chunk=0, normalization="none", *, out=None,
              initial_state=None, return_state=False, threads=0):
    """Multi-head retention (docs/math.md §2): q, k [B, T, H, dk], v [B, T, H, dv] -> o [B, T, H, dv].

    form: "parallel", "recurrent" or "chunkwise" (chunk: its length, 0 = automatic);
    normalization: "none", "decay" or "decay_and_score"; gammas: H decays in (0, 1].
    initial_state: a RetentionState carried in from earlier tokens. return_state=True returns
    (o, final_state) so that a later call (any form, or retention_step) continues the sequence.
    out: an array/tensor [B, T, H, dv] to write into (returned as is).
    """
    fn = "retention"
    qa, ka, va = (_as_numpy(x, n, fn) for x, n in ((q, "q"), (k, "k"), (v, "v")))
    B, T, H, dk = _dims(qa, "q", fn)
    dv = _dims(va, "v", fn)[3]
    o, oa = _output(q, (B, T, H, dv), out, "out", fn)
    final = None
    if return_state:
        final = RetentionState(B, H, dk, dv, str(qa.dtype))
    _core.retention_into(qa, ka, va, oa, _gammas(gammas, fn), form, int(chunk), normalization,
                         _state(initial_state, "initial_state", fn), final, int(threads))
    return (o, final) if return_state else o


def retention_step(q, k, v, gammas, state, normalization="none", *, out=None, threads=0):
    """One decoding step: q, k [B, H, dk], v [B, H, dv] -> o [B, H, dv]; `state` (a
    RetentionState) advances by one token in place."""
    fn = "retention_step"
    qa, ka, va = (_as_numpy(x, n, fn) for x, n in ((q, "q"), (k, "k"), (v, "v")))
    if qa.ndim != 3 or va.ndim != 3:
        raise ValueError(f"{fn}: q and v must be [batch, heads, dim], got {list(qa.shape)} and "
                         f"{list(va.shape)}")
    o, oa = _output(q, (qa.shape[0], qa.shape[1], va.shape[2]), out, "out", fn)
    if not isinstance(state, RetentionState):
        raise TypeError(f"{fn}: state must be a retention.RetentionState, "
                        f"got {type(state).__name__}")
    _core.retention_step_into(qa, ka, va, oa, _gammas(gammas, fn), state, normalization,
                              int(threads))
    return o


def retention_backward(q, k, v, d_out, gammas, form="chunkwise", chunk=0, normalization="none",
                       *, detach_score_normalizer=False, initial_state=None,
                       final_state_grad=None, return_state_grad=False, dq=None, dk=None,
                       dv=None, threads=0):
    """Gradients of retention (docs/math.md §7): d_out = dL/do [B, T, H, dv] -> (dq, dk, dv).

    final_state_grad: dL/d(final state) as a RetentionState (its S and z). return_state_grad=True
    (needs initial_state) also returns dL/d(initial state) as a RetentionState.
    """
    fn = "retention_backward"
    qa, ka, va, ga = (_as_numpy(x, n, fn)
                      for x, n in ((q, "q"), (k, "k"), (v, "v"), (d_out, "d_out")))
    B, T, H, dk_ = _dims(qa, "q", fn)
    dv_ = _dims(va, "v", fn)[3]
    dq, dqa = _output(q, (B, T, H, dk_), dq, "dq", fn)
    dk, dka = _output(q, (B, T, H, dk_), dk, "dk", fn)
    dv, dva = _output(q, (B, T, H, dv_), dv, "dv", fn)
    d_init = None
    if return_state_grad:
        if initial_state is None:
            raise ValueError(f"{fn}: return_state_grad needs initial_state")
        d_init = RetentionState(B, H, dk_, dv_, str(qa.dtype))
    _core.retention_backward_into(qa, ka, va, ga, dqa, dka, dva, _gammas(gammas, fn), form,
                                  int(chunk), normalization, bool(detach_score_normalizer),
                                  _state(initial_state, "initial_state", fn),
                                  _state(final_state_grad, "final_state_grad", fn), d_init,
                                  int(threads))
    return (dq, dk, dv, d_init) if return_state_grad else (dq, dk, dv)


# ---- MaSA / MaSAD ---------------------------------------------------------------------------

def _grid(q, k, v, gammas, height, width, fn):
    qa, ka, va = (_as_numpy(x, n, fn) for x, n in ((q, "q"), (k, "k"), (v, "v")))
    B, N, H, _ = _dims(qa, "q", fn)
    dv = _dims(va, "v", fn)[3]
    if int(height) * int(width) != N:
        raise ValueError(f"{fn}: q has {N} tokens, expected height * width = "
                         f"{int(height)} * {int(width)}")
    return qa, ka, va, B, N, H, dv, _gammas(gammas, fn)


def masa(q, k, v, gammas, height, width, *, out=None, threads=0):
    """MaSA (docs/math.md §4): per head softmax_row(q k^T + ln D) v, D the Manhattan decay of
    gammas[h] on a height x width grid. q, k [B, N, H, dk], v [B, N, H, dv] with N = height *
    width in raster order -> o [B, N, H, dv]."""
    qa, ka, va, B, N, H, dv, g = _grid(q, k, v, gammas, height, width, "masa")
    o, oa = _output(q, (B, N, H, dv), out, "out", "masa")
    _core.masa_into(qa, ka, va, oa, g, int(height), int(width), int(threads))
    return o


def masad(q, k, v, gammas, height, width, *, out=None, threads=0):
    """MaSAD (docs/math.md §4): softmax attention along each grid row, then each column, with the
    1-D decays of gammas[h]. Operands as masa."""
    qa, ka, va, B, N, H, dv, g = _grid(q, k, v, gammas, height, width, "masad")
    o, oa = _output(q, (B, N, H, dv), out, "out", "masad")
    _core.masad_into(qa, ka, va, oa, g, int(height), int(width), int(threads))
    return o


def masa_forward_train(q, k, v, gammas, height, width, *, threads=0):
    """MaSA forward for training: (o [B, N, H, dv], lse [B, N, H]), lse the logits' row
    log-sum-exp that masa_backward needs."""
    fn = "masa_forward_train"
    qa, ka, va, B, N, H, dv, g = _grid(q, k, v, gammas, height, width, fn)
    o, oa = _output(q, (B, N, H, dv), None, "out", fn)
    lse, lsea = _output(q, (B, N, H), None, "lse", fn)
    _core.masa_forward_train_into(qa, ka, va, oa, lsea, g, int(height), int(width), int(threads))
    return o, lse


def masa_backward(q, k, v, gammas, height, width, out, lse, d_out, *, threads=0):
    """MaSA backward (docs/math.md §7) from masa_forward_train's (out, lse): -> (dq, dk, dv)."""
    fn = "masa_backward"
    qa, ka, va, B, N, H, dv, g = _grid(q, k, v, gammas, height, width, fn)
    oa, la, ga = (_as_numpy(x, n, fn) for x, n in ((out, "out"), (lse, "lse"), (d_out, "d_out")))
    dq, dqa = _output(q, qa.shape, None, "dq", fn)
    dk, dka = _output(q, qa.shape, None, "dk", fn)
    dvv, dva = _output(q, va.shape, None, "dv", fn)
    _core.masa_backward_into(qa, ka, va, oa, la, ga, dqa, dka, dva, g, int(height), int(width),
                             int(threads))
    return dq, dk, dvv


def masad_forward_train(q, k, v, gammas, height, width, *, threads=0):
    """MaSAD forward for training: (o, u [B, N, H, dv], row_lse, column_lse [B, N, H])."""
    fn = "masad_forward_train"
    qa, ka, va, B, N, H, dv, g = _grid(q, k, v, gammas, height, width, fn)
    o, oa = _output(q, (B, N, H, dv), None, "out", fn)
    u, ua = _output(q, (B, N, H, dv), None, "u", fn)
    rl, rla = _output(q, (B, N, H), None, "row_lse", fn)
    cl, cla = _output(q, (B, N, H), None, "column_lse", fn)
    _core.masad_forward_train_into(qa, ka, va, oa, ua, rla, cla, g, int(height), int(width),
                                   int(threads))
    return o, u, rl, cl


def masad_backward(q, k, v, gammas, height, width, out, u, row_lse, column_lse, d_out, *,
                   threads=0):
    """MaSAD backward from masad_forward_train's saved arrays: -> (dq, dk, dv)."""
    fn = "masad_backward"
    qa, ka, va, B, N, H, dv, g = _grid(q, k, v, gammas, height, width, fn)
    saved = [_as_numpy(x, n, fn) for x, n in ((out, "out"), (u, "u"), (row_lse, "row_lse"),
                                              (column_lse, "column_lse"), (d_out, "d_out"))]
    dq, dqa = _output(q, qa.shape, None, "dq", fn)
    dk, dka = _output(q, qa.shape, None, "dk", fn)
    dvv, dva = _output(q, va.shape, None, "dv", fn)
    _core.masad_backward_into(qa, ka, va, *saved, dqa, dka, dva, g, int(height), int(width),
                              int(threads))
    return dq, dk, dvv


# ---- layers ---------------------------------------------------------------------------------

def parameters(state_dict):
    """A ParameterMap of views of a state_dict's tensors (or a dict of NumPy arrays): float64,
    float32, float16 and bfloat16 are read as stored; tensors that are not contiguous CPU tensors
    are copied once into a contiguous CPU tensor the map keeps alive."""
    pm = ParameterMap()
    for name, t in state_dict.items():
        if _is_torch(t):
            import torch

            t = t.detach().cpu().contiguous()
            if t.dtype == torch.bfloat16:
                pm.add(name, t.view(torch.int16).numpy(), "bfloat16")
                continue
            if t.dtype not in (torch.float64, torch.float32, torch.float16):
                raise TypeError(f"parameters: '{name}' has dtype {t.dtype}, expected a "
                                "floating type")
            arr = t.numpy()
        else:
            arr = _np.ascontiguousarray(t)
        if arr.dtype not in (_np.float64, _np.float32, _np.float16):
            raise TypeError(f"parameters: '{name}' has dtype {arr.dtype}, expected float64, "
                            "float32 or float16")
        pm.add(name, arr, str(arr.dtype))
    return pm


def _to_params(source):
    return source if isinstance(source, ParameterMap) else parameters(source)


class _Layer:
    """Holds the C++ layer of the chosen dtype; converts tensors in and out (no copies)."""

    _names = {}

    def __init__(self, kind, dtype, *args, **kwargs):
        dtype = str(dtype).replace("torch.", "")
        if dtype not in ("float64", "float32"):
            raise TypeError(f"{kind}: dtype must be float64 or float32, got {dtype}")
        self.dtype = dtype
        self._impl = getattr(_core, f"{kind}_{dtype}")(*args, **kwargs)
        self._kind = kind

    def _in(self, x, name="x"):
        return _as_numpy(x, name, f"{self._kind}.forward")

    @staticmethod
    def _out(proto, y):
        if _is_torch(proto):
            import torch

            return torch.from_numpy(y)
        return y

    def load(self, state_dict, prefix="", **kwargs):
        """Loads the layer's parameters by their PyTorch names under `prefix` from a state_dict
        (a dict of tensors or arrays) or a ParameterMap."""
        self._impl.load(_to_params(state_dict), prefix, **kwargs)
        return self

    load_state_dict = load

    def __getattr__(self, name):
        return getattr(self.__dict__["_impl"], name)


class MultiScaleRetention(_Layer):
    """RetNet multi-scale retention (docs/math.md §3) with torchscale's parameter names
    (q_proj, k_proj, v_proj, g_proj, out_proj). forward(x [T, d] or [B, T, d])."""

    def __init__(self, embed_dim, heads, value_dim=0, gammas=(), normalization="decay_and_score",
                 head_norm="rms", eps=1e-6, biases=False, form="chunkwise", chunk=0, threads=0,
                 dtype="float64", packed_weights=False, keep_buffers=True):
        super().__init__("MultiScaleRetention", dtype, embed_dim, heads, value_dim,
                         _gammas(gammas, "MultiScaleRetention"), normalization, head_norm, eps,
                         biases, form, chunk, threads, bool(packed_weights), bool(keep_buffers))
        self._form, self._chunk = form, chunk

    def forward(self, x, form=None, chunk=None):
        xa = self._in(x)
        form = self._form if form is None else form
        chunk = self._chunk if chunk is None else chunk
        if xa.ndim == 3:
            B, T, d = xa.shape
            y = self._impl.forward(xa.reshape(B * T, d), B, form, chunk).reshape(B, T, -1)
        else:
            y = self._impl.forward(xa, 1, form, chunk)
        return self._out(x, y)

    __call__ = forward

    def make_state(self):
        return self._impl.make_state()

    def prefill(self, x, state, form=None, chunk=None):
        """x [T, d] from state.position on; state advances by T."""
        form = self._form if form is None else form
        chunk = self._chunk if chunk is None else chunk
        return self._out(x, self._impl.prefill(self._in(x), state, form, chunk))

    def step(self, x_t, state):
        """x_t [d] or [1, d] -> [d] or [1, d]; state advances by one token."""
        xa = self._in(x_t, "x_t")
        y = self._impl.step(xa.reshape(1, -1), state)
        return self._out(x_t, y.reshape(xa.shape))


class ManhattanAttention(_Layer):
    """RMT attention (docs/math.md §4) with the RMT code's names (q_proj, k_proj, v_proj,
    out_proj, lepe.conv); load(state_dict, prefix, decay_name=...) reads the stage's decay."""

    def __init__(self, embed_dim, heads, value_factor=1, initial_value=2.0, heads_range=4.0,
                 gammas=(), mode="full", threads=0, dtype="float64", packed_weights=False):
        super().__init__("ManhattanAttention", dtype, embed_dim, heads, value_factor,
                         initial_value, heads_range, _gammas(gammas, "ManhattanAttention"), mode,
                         threads, bool(packed_weights))
        self._mode = mode

    def forward(self, x, mode=None):
        """x [B, H, W, C] (or [H, W, C]) -> the same shape."""
        xa = self._in(x)
        squeeze = xa.ndim == 3
        if squeeze:
            xa = xa[None]
        if xa.ndim != 4:
            raise ValueError(f"ManhattanAttention.forward: x is {list(xa.shape)}, expected "
                             "[batch, height, width, channels]")
        B, Hh, W, C = xa.shape
        y = self._impl.forward(xa.reshape(B * Hh * W, C), B, Hh, W,
                               self._mode if mode is None else mode)
        y = y.reshape(B, Hh, W, -1)
        return self._out(x, y[0] if squeeze else y)

    __call__ = forward


class VirRetention(_Layer):
    """ViR multi-head retention (docs/math.md §5): qkv, out_proj. forward(x [T, C])."""

    def __init__(self, embed_dim, heads, gammas=(), dtype="float64", packed_weights=False):
        super().__init__("VirRetention", dtype, embed_dim, heads, _gammas(gammas, "VirRetention"),
                         bool(packed_weights))

    def forward(self, x, form="parallel", chunk=0, threads=0):
        return self._out(x, self._impl.forward(self._in(x), form, chunk, threads))

    __call__ = forward


class VirBlock(_Layer):
    """ViR block (docs/math.md §5): norm1, retention, ls1, norm2, mlp.fc1/fc2, ls2."""

    def __init__(self, embed_dim, heads, mlp_ratio=4.0, layer_norm_eps=1e-6,
                 layer_scale_init=1.0, gammas=(), dtype="float64", packed_weights=False):
        super().__init__("VirBlock", dtype, embed_dim, heads, mlp_ratio, layer_norm_eps,
                         layer_scale_init, _gammas(gammas, "VirBlock"), bool(packed_weights))

    def forward(self, x, form="parallel", chunk=0, threads=0):
        return self._out(x, self._impl.forward(self._in(x), form, chunk, threads))

    __call__ = forward


class VirEncoder(_Layer):
    """ViR encoder (docs/math.md §5): image [H, W, in_channels] -> feature [C]."""

    def __init__(self, image_size=224, patch_size=16, in_channels=3, embed_dim=384, heads=6,
                 depth=12, mlp_ratio=4.0, layer_norm_eps=1e-6, layer_scale_init=1.0, gammas=(),
                 seed=0, dtype="float64", packed_weights=False):
        super().__init__("VirEncoder", dtype, image_size, patch_size, in_channels, embed_dim,
                         heads, depth, mlp_ratio, layer_norm_eps, layer_scale_init,
                         _gammas(gammas, "VirEncoder"), seed, bool(packed_weights))

    def forward(self, image, form="parallel", chunk=0, order="layer_major", threads=0,
                tokens=False):
        return self._out(image, self._impl.forward(self._in(image, "image"), form, chunk, order,
                                                   threads, tokens))

    __call__ = forward
