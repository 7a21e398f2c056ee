#!/usr/bin/python3
"""The Python module's side of bench/compare (issue 12): retention.torch's autograd function and the
batched decode step, timed through the module the way a Python user calls them.

    python_module_bench.py verify DIR            the module against bench_speed --dump_dir's outputs and
                                                 gradients, and its decode step against the PyTorch peer's
    python_module_bench.py bench --threads N     time, print JSON

Needs the built module on PYTHONPATH (<build>/python; bench/compare builds it) and Debian's python3-torch.
Timed (medians, after a warm-up):
  train_T8192        B=1 T=8192 H=8 d=128 float32: o = retention.torch.retention(q, k, v, gammas, "chunkwise",
                     threads=N); o.backward(dO) with q, k, v leaves [B, T, H, D] (their grads reset first), the
                     same step as bench_speed's chunkwise_train and the peer's train_T8192
  decode_B8_H16_pos100/<path>   one batched step B=8 H=16 d=128 float32, decay_and_score, from position 100
                     on a random state, per call: api_numpy (retention.retention_step on NumPy arrays with
                     out=), api_torch (the same on torch tensors), core (retention._core.retention_step_into
                     itself: the binding without the Python wrapper). C++'s equivalent is bench_speed's
                     decode_kept (masks and workspace kept, as the module keeps them in the state).
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

import retention
import retention.torch as rt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_retention as peer  # noqa: E402  (the peer's layout helpers and decode step)

torch.set_grad_enabled(True)  # the peer module turns it off at import

DECODE = dict(batch=8, heads=16, dim=128, position=100)


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if not np.isfinite(a).all():
        return float("inf")
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def decode_inputs(seed=5):
    """Random q, k, v [B, H, d] and a random state (S, z, positions) at DECODE's position."""
    b, h, d = DECODE["batch"], DECODE["heads"], DECODE["dim"]
    rng = np.random.default_rng(seed)
    q = rng.uniform(-1, 1, (b, h, d)).astype(np.float32)
    k = (0.05 * rng.uniform(-1, 1, (b, h, d))).astype(np.float32)
    v = rng.uniform(-1, 1, (b, h, d)).astype(np.float32)
    S = rng.uniform(-1, 1, (b, h, d, d)).astype(np.float32)
    z = rng.uniform(-1, 1, (b, h, d)).astype(np.float32)
    positions = np.full((b, h), DECODE["position"], dtype=np.int64)
    return q, k, v, S, z, positions


def verify(directory):
    worst = 0.0
    meta = {f[0]: list(map(int, f[1:])) for f in (line.split() for line in
                                                   open(os.path.join(directory, "meta.txt"))) if f}
    b, t, h, dk, dv, c = meta["retgrad"]
    load = lambda name, d: peer.load(os.path.join(directory, name), (b, t, h, d))
    q, k, v = (load(f"ret_{x}.f32", d).requires_grad_() for x, d in (("q", dk), ("k", dk), ("v", dv)))
    d_out = load("ret_dout.f32", dv)
    gammas = retention.retnet_gammas(h)
    o = rt.retention(q, k, v, gammas, "chunkwise", c, threads=2)
    o.backward(d_out)
    checks = [("out", o.detach(), load("ret_out_chunkwise.f32", dv))]
    checks += [(f"d{x}", g.grad, load(f"ret_d{x}.f32", d)) for x, g, d in (("q", q, dk), ("k", k, dk), ("v", v, dv))]
    for name, mine, ours in checks:
        e = rel_err(mine.numpy(), ours.numpy())
        worst = max(worst, e)
        print(f"verify module    retention.torch chunkwise C={c} B={b} T={t} H={h} dk={dk} dv={dv} {name}: "
              f"rel err {e:.2e} vs bench_speed")
    # The decode step against the PyTorch peer's (an independent implementation of the same step).
    bb, hh, d, pos = DECODE["batch"], DECODE["heads"], DECODE["dim"], DECODE["position"]
    qd, kd, vd, S, z, positions = decode_inputs()
    state = retention.RetentionState(bb, hh, d, d, "float32")
    state.set(S, z, positions)
    out = retention.retention_step(qd, kd, vd, retention.retnet_gammas(hh), state, "decay_and_score")
    dec = peer.Decoder(bb, hh, d, d, peer.retnet_gammas(hh), pos)
    dec.s, dec.z = torch.from_numpy(S.reshape(bb * hh, d, d)).clone(), torch.from_numpy(z.reshape(bb * hh, d)).clone()
    ref = dec.step(*(torch.from_numpy(x.reshape(bb * hh, d)) for x in (qd, kd, vd)))
    for name, mine, theirs in (("out", out, ref), ("S", state.S, dec.s), ("z", state.z, dec.z)):
        e = rel_err(mine.reshape(-1), theirs.numpy().reshape(-1))
        worst = max(worst, e)
        print(f"verify module    retention_step B={bb} H={hh} d={d} position {pos} {name}: rel err {e:.2e} "
              "vs the PyTorch peer")
    ok = worst <= 1e-4
    print(f"verify module: worst rel err {worst:.2e} -> {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


def median_seconds(fn, reps, budget=1.0):
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < reps or (len(times) < max(reps, 15) and time.perf_counter() - start < budget):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def per_call_seconds(fn, reps, sample=0.02):
    """Median over samples of the mean time of a batch of calls (one call is a few microseconds to
    tens of them: too short to time alone)."""
    for _ in range(20):
        fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < sample:
        fn()
        n += 1
    samples = []
    for _ in range(max(reps, 15)):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t0) / n)
    return statistics.median(samples)


def bench(threads, reps):
    torch.set_num_threads(threads)
    res = {}
    gen = torch.Generator().manual_seed(1)
    rnd = lambda *s, scale=1.0: (torch.rand(*s, generator=gen) * 2 - 1) * scale
    b, t, h, d = 1, 8192, 8, 128
    q, k, v = (x.requires_grad_() for x in (rnd(b, t, h, d), rnd(b, t, h, d, scale=d ** -0.5), rnd(b, t, h, d)))
    d_out = rnd(b, t, h, d)
    gammas = retention.retnet_gammas(h)

    def train():
        for x in (q, k, v):
            x.grad = None
        rt.retention(q, k, v, gammas, "chunkwise", 0, threads=threads).backward(d_out)

    res["train_T8192"] = {"seconds": median_seconds(train, reps), "chunk": retention.recommended_chunk(d, d)}

    bb, hh, dd = DECODE["batch"], DECODE["heads"], DECODE["dim"]
    qd, kd, vd, S, z, positions = decode_inputs()
    g = retention.retnet_gammas(hh)
    state = retention.RetentionState(bb, hh, dd, dd, "float32")
    state.set(S, z, positions)
    out = np.empty((bb, hh, dd), dtype=np.float32)
    qt, kt, vt, outt = (torch.from_numpy(x) for x in (qd, kd, vd, out))
    paths = {
        "api_numpy": lambda: retention.retention_step(qd, kd, vd, g, state, "decay_and_score", out=out,
                                                      threads=threads),
        "api_torch": lambda: retention.retention_step(qt, kt, vt, g, state, "decay_and_score", out=outt,
                                                      threads=threads),
        "core": lambda: retention._core.retention_step_into(qd, kd, vd, out, g, state, "decay_and_score", threads),
    }
    for name, fn in paths.items():
        state.set(S, z, positions)
        res[f"decode_B8_H16_pos100/{name}"] = {"seconds": per_call_seconds(fn, reps)}
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify")
    v.add_argument("dir")
    b = sub.add_parser("bench")
    b.add_argument("--threads", type=int, default=1)
    b.add_argument("--repetitions", type=int, default=5)
    args = ap.parse_args()
    if args.cmd == "verify":
        return verify(args.dir)
    out = {"module": os.path.dirname(retention.__file__), "torch": torch.__version__, "threads": args.threads,
           "results": bench(args.threads, max(1, args.repetitions))}
    json.dump(out, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
