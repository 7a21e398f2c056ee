#!/usr/bin/env python3
"""Write .safetensors files with NumPy alone (no `safetensors` package needed).

Format: an 8-byte little-endian header length N, N bytes of JSON header (tensor name ->
{"dtype", "shape", "data_offsets": [begin, end]} relative to the data section, plus an optional
"__metadata__" string -> string map), then the raw row-major little-endian tensor bytes.

As a module:
    import safetensors_write as sw
    sw.save_file({"w": np.ones((2, 3), np.float32)}, "out.safetensors", metadata={"k": "v"})
    sw.save_file({"b": (bf16_bits_uint16, "BF16")}, ...)   # raw bits with an explicit dtype
    sw.save_file(torch_model.state_dict(), ...)              # torch tensors (bfloat16 too)

As a command line tool (needs torch only to unpickle the checkpoint):
    python3 safetensors_write.py model.pt model.safetensors [--key state_dict]
        [--metadata format=pt ...] [--unsafe-load]
"""

import argparse
import json
import os
import struct
import sys

import numpy as np

__all__ = ["serialize", "save_file", "float32_to_bf16_bits", "flatten_state_dict"]

# NumPy dtype -> safetensors dtype name.
_NUMPY_TO_SAFETENSORS = {
    np.dtype(np.float64): "F64",
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.int16): "I16",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint64): "U64",
    np.dtype(np.uint32): "U32",
    np.dtype(np.uint16): "U16",
    np.dtype(np.uint8): "U8",
    np.dtype(np.bool_): "BOOL",
}

# Element size of every safetensors dtype (for arrays of raw bits given with an explicit dtype).
_DTYPE_SIZE = {
    "F64": 8, "I64": 8, "U64": 8,
    "F32": 4, "I32": 4, "U32": 4,
    "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "I8": 1, "U8": 1, "BOOL": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
}


def float32_to_bf16_bits(values):
    """bfloat16 bit patterns (uint16) of float32 values, rounded to nearest even; NaN stays NaN."""
    f = np.ascontiguousarray(values, dtype=np.float32)
    u = f.view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    bits = rounded.astype(np.uint16)
    nan = np.isnan(f)
    # Rounding could carry a NaN's payload into the exponent; keep NaN quiet with the sign.
    bits[nan] = ((u[nan] >> 16).astype(np.uint16) & 0x8000) | 0x7FC0
    return bits


def _torch_to_numpy(tensor):
    """(array, dtype name) of a torch tensor; bfloat16 / float8 travel as raw bits."""
    import torch  # only reached when a torch tensor was given

    t = tensor.detach().cpu().contiguous()
    raw = {torch.bfloat16: (torch.int16, "BF16")}
    for attr, name in (("float8_e5m2", "F8_E5M2"), ("float8_e4m3fn", "F8_E4M3")):
        if hasattr(torch, attr):
            raw[getattr(torch, attr)] = (torch.int8, name)
    if t.dtype in raw:
        view_dtype, name = raw[t.dtype]
        return t.view(view_dtype).numpy(), name
    return t.numpy(), None


def _as_array(name, value):
    """(contiguous little-endian array, safetensors dtype name) for one input value."""
    explicit = None
    if isinstance(value, tuple):
        if len(value) != 2 or not isinstance(value[1], str):
            raise TypeError(f"tensor {name!r}: a tuple must be (raw bits array, dtype name)")
        value, explicit = value
        if explicit not in _DTYPE_SIZE:
            raise ValueError(f"tensor {name!r}: unknown dtype {explicit!r}")
    if type(value).__module__.split(".")[0] == "torch":
        value, torch_dtype = _torch_to_numpy(value)
        explicit = explicit or torch_dtype
    array = np.asarray(value)
    if explicit is None:
        dtype = _NUMPY_TO_SAFETENSORS.get(array.dtype.newbyteorder("="))
        if dtype is None:
            raise TypeError(f"tensor {name!r}: dtype {array.dtype} has no safetensors equivalent")
    else:
        dtype = explicit
        if array.dtype.itemsize != _DTYPE_SIZE[dtype]:
            raise ValueError(f"tensor {name!r}: {dtype} needs {_DTYPE_SIZE[dtype]}-byte items, "
                             f"got {array.dtype}")
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and sys.byteorder == "big"):
        array = array.astype(array.dtype.newbyteorder("<"))
    # np.ascontiguousarray would turn a 0-d array into shape (1,): keep scalars rank 0.
    if not array.flags.c_contiguous:
        array = array.copy(order="C")
    return array, dtype


def serialize(tensors, metadata=None):
    """The bytes of a .safetensors file holding `tensors` (name -> NumPy array, torch tensor, or
    (raw bits array, dtype name)) and `metadata` (str -> str) as __metadata__ when given."""
    arrays = {}
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {name!r}")
        if name == "__metadata__":
            raise ValueError("'__metadata__' is reserved and cannot name a tensor")
        arrays[name] = _as_array(name, value)
    # Largest element size first, then by name: each tensor then starts at a multiple of its
    # element size (the header is padded to a multiple of 8), so readers can map it in place.
    order = sorted(arrays, key=lambda n: (-_DTYPE_SIZE[arrays[n][1]], n))
    header = {}
    if metadata:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"metadata must map str to str, got {k!r}: {v!r}")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name in order:
        array, dtype = arrays[name]
        header[name] = {"dtype": dtype, "shape": [int(d) for d in array.shape],
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    parts = [struct.pack("<Q", len(text)), text]
    parts += [arrays[name][0].tobytes(order="C") for name in order]
    return b"".join(parts)


def save_file(tensors, path, metadata=None):
    """Writes serialize(tensors, metadata) to `path` (through a temporary file renamed into place,
    so that a reader mapping the old file keeps valid bytes)."""
    data = serialize(tensors, metadata)
    partial = f"{path}.partial"
    with open(partial, "wb") as f:
        f.write(data)
    os.replace(partial, path)


def flatten_state_dict(obj, prefix=""):
    """name -> tensor from a (possibly nested) mapping or nn.Module, nested names joined by '.'."""
    if hasattr(obj, "state_dict") and callable(obj.state_dict):
        obj = obj.state_dict()
    if not hasattr(obj, "items"):
        raise TypeError(f"{prefix or 'checkpoint'!r} is a {type(obj).__name__}, not a mapping")
    out = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if hasattr(value, "items"):
            out.update(flatten_state_dict(value, name + "."))
        elif type(value).__module__.split(".")[0] in ("torch", "numpy"):
            out[name] = value
        else:
            raise TypeError(f"{name!r} is a {type(value).__name__}, not a tensor "
                            "(select the state dict with --key)")
    return out


def _load_checkpoint(path, unsafe):
    import torch

    if unsafe:
        return torch.load(path, map_location="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except TypeError:  # torch too old to know weights_only
        return torch.load(path, map_location="cpu")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Convert a torch .pt state dict to .safetensors")
    parser.add_argument("input", help="torch checkpoint (.pt / .pth / .bin)")
    parser.add_argument("output", help=".safetensors file to write")
    parser.add_argument("--key", help="use checkpoint[KEY] (e.g. state_dict or model)")
    parser.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE",
                        help="add a __metadata__ entry (repeatable)")
    parser.add_argument("--unsafe-load", action="store_true",
                        help="unpickle arbitrary objects (only for checkpoints you trust)")
    args = parser.parse_args(argv)

    checkpoint = _load_checkpoint(args.input, args.unsafe_load)
    if args.key is not None:
        checkpoint = checkpoint[args.key]
    metadata = {}
    for item in args.metadata:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--metadata expects KEY=VALUE, got {item!r}")
        metadata[key] = value
    tensors = flatten_state_dict(checkpoint)
    save_file(tensors, args.output, metadata or None)
    print(f"wrote {len(tensors)} tensors to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
