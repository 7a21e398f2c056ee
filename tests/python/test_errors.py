"""Bad input is a Python exception with a clear message, never a crash: the library's shape_error
as ValueError (retention.ShapeError) with the C++ message, wrong dtypes as TypeError, tensors the
kernels cannot read (other devices, non-contiguous rows, aliased outputs) as ValueError. Also: the
GIL is released while a kernel runs."""

import sys
import threading

import numpy as np
import pytest
import torch

import retention
import retention.torch as rt


def qkv(B=1, T=6, H=2, dk=4, dv=3, dtype=torch.float64):
    return (torch.randn(B, T, H, dk, dtype=dtype), torch.randn(B, T, H, dk, dtype=dtype),
            torch.randn(B, T, H, dv, dtype=dtype))


def test_shape_error_is_value_error_with_the_cpp_message():
    q, k, v = qkv()
    assert issubclass(retention.ShapeError, ValueError)
    with pytest.raises(retention.ShapeError,
                       match=r"multi_head_retention: k is \[1, 5, 2, 4\], expected \[1, 6, 2, 4\]"):
        retention.retention(q, k[:, :5], v, [0.9, 0.9])
    with pytest.raises(ValueError, match=r"gamma must be in \(0, 1\], got 1.5"):
        retention.retention(q, k, v, [0.9, 1.5])
    with pytest.raises(ValueError, match="masks has 3 entries, expected heads = 2"):
        retention.retention(q, k, v, [0.9, 0.9, 0.9])
    with pytest.raises(ValueError, match="chunk must be >= 0"):
        retention.retention(q, k, v, [0.9, 0.9], chunk=-1)


def test_bad_options():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="form must be one of"):
        retention.retention(q, k, v, [0.9, 0.9], form="sideways")
    with pytest.raises(ValueError, match="normalization must be one of"):
        retention.retention(q, k, v, [0.9, 0.9], normalization="softmax")
    with pytest.raises(ValueError, match="form must be one of"):
        rt.retention(q, k, v, [0.9, 0.9], form="sideways")
    with pytest.raises(TypeError, match="gammas"):
        retention.retention(q, k, v, 0.9)


def test_dtypes():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="torch.float16"):
        retention.retention(q.half(), k.half(), v.half(), [0.9, 0.9])
    with pytest.raises(TypeError, match="expected float64 like the first input"):
        retention.retention(q, k.float(), v, [0.9, 0.9])
    with pytest.raises(TypeError, match="int64"):
        retention.retention(np.zeros((1, 2, 1, 2), dtype=np.int64), k.numpy(), v.numpy(), [0.9])
    with pytest.raises(TypeError, match="numpy.ndarray or a torch CPU tensor"):
        retention.retention([[[[1.0]]]], k, v, [0.9])


def test_device_and_layout():
    q, k, v = qkv()
    meta = torch.empty(1, 6, 2, 4, dtype=torch.float64, device="meta")
    with pytest.raises(ValueError, match="CPU tensors"):
        retention.retention(meta, k, v, [0.9, 0.9])
    with pytest.raises(ValueError, match="CPU tensors"):
        rt.retention(meta, k, v, [0.9, 0.9])
    # [B, T, H, D] whose last dimension is strided: rows are not contiguous.
    qt = torch.randn(1, 6, 2, 4, dtype=torch.float64).transpose(1, 3).contiguous().transpose(1, 3)
    assert qt.stride(-1) != 1
    with pytest.raises(ValueError, match="not contiguous in its last dimension"):
        retention.retention(qt, k, v, [0.9, 0.9])
    with pytest.raises(ValueError, match="not contiguous in its last dimension"):
        rt.retention(qt.requires_grad_(), k, v, [0.9, 0.9])
    with pytest.raises(ValueError, match="expected 4 dimensions"):
        retention.retention(q[0], k[0], v[0], [0.9, 0.9])
    with pytest.raises(ValueError, match="negative or misaligned stride"):
        retention.retention(q.numpy()[:, ::-1], k.numpy(), v.numpy(), [0.9, 0.9])


def test_outputs():
    q, k, v = qkv()
    ro = np.zeros((1, 6, 2, 3))
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):
        retention.retention(q.numpy(), k.numpy(), v.numpy(), [0.9, 0.9], out=ro)
    expanded = torch.zeros(1, 1, 1, 3, dtype=torch.float64).expand(1, 6, 2, 3)
    with pytest.raises(ValueError, match="overlapping elements"):
        retention.retention(q, k, v, [0.9, 0.9], out=expanded)
    with pytest.raises(ValueError, match=r"out is \[1, 6, 2, 4\], expected \[1, 6, 2, 3\]"):
        retention.retention(q, k, v, [0.9, 0.9], out=torch.empty(1, 6, 2, 4, dtype=torch.float64))
    # out aliasing an input: the C++ check names it.
    buf = torch.randn(1, 6, 2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="out overlaps q"):
        retention.retention(buf, k, buf[..., :4], [0.9, 0.9], out=buf)
    with pytest.raises(ValueError, match="dq overlaps q"):
        retention.retention_backward(q, k, v, torch.randn(1, 6, 2, 3, dtype=torch.float64),
                                     [0.9, 0.9], dq=q)


def test_states():
    q, k, v = qkv()
    st = retention.RetentionState(1, 2, 4, 5)
    with pytest.raises(ValueError, match="initial_state is for"):
        retention.retention(q, k, v, [0.9, 0.9], initial_state=st)
    st32 = retention.RetentionState(1, 2, 4, 3, dtype="float32")
    with pytest.raises(TypeError, match="holds float32 states"):
        retention.retention(q, k, v, [0.9, 0.9], initial_state=st32)
    with pytest.raises(TypeError, match="must be a retention.RetentionState"):
        retention.retention(q, k, v, [0.9, 0.9], initial_state="state")
    with pytest.raises(ValueError, match="batch must be >= 1"):
        retention.RetentionState(0, 2, 4, 3)
    good = retention.RetentionState(1, 2, 4, 3)
    with pytest.raises(ValueError, match="must be \\[batch, heads, dim\\]"):
        retention.retention_step(q, k, v, [0.9, 0.9], good)
    with pytest.raises(ValueError, match="positions must be >= 0"):
        good.set(np.zeros((1, 2, 4, 3)), np.zeros((1, 2, 4)), np.full((1, 2), -1, dtype=np.int64))


def test_masa_errors():
    q, k, v = qkv(T=6)
    with pytest.raises(ValueError, match="expected height \\* width = 2 \\* 2"):
        retention.masa(q, k, v, [0.9, 0.9], 2, 2)
    with pytest.raises(ValueError, match="gamma must be in"):
        retention.masad(q, k, v, [0.9, 0.0], 2, 3)
    with pytest.raises(ValueError, match="gamma must be in"):
        rt.masa(q, k, v, [0.9, 2.0], 2, 3)


def test_gil_released_while_a_kernel_runs():
    # With a long switch interval the only way the main thread runs while the worker is inside
    # the kernel is that the kernel released the GIL; the main thread sleeps (releasing the GIL)
    # between counts, so the worker gets it back as soon as the kernel returns.
    q, k, v = qkv(B=1, T=1536, H=2, dk=64, dv=64)
    counter = [0]
    during = []
    done = threading.Event()

    def worker():
        before = counter[0]
        retention.retention(q, k, v, [0.99, 0.999], form="parallel", threads=1)
        during.append(counter[0] - before)
        done.set()

    old = sys.getswitchinterval()
    sys.setswitchinterval(30.0)
    try:
        t = threading.Thread(target=worker)
        t.start()
        while not done.is_set():
            counter[0] += 1
            done.wait(0.0005)
        t.join()
    finally:
        sys.setswitchinterval(old)
    assert during[0] >= 3, f"the main thread ran {during[0]} times during the kernel"
