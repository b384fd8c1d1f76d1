"""Reading and writing HF weight files.

``WeightFiles`` indexes a model directory (``model.safetensors``, or a sharded set listed in
``model.safetensors.index.json``) and hands out memory-mapped numpy views, so reading one
device's shard touches only those bytes. Pickle ``.bin`` checkpoints can run arbitrary code when
loaded and are refused unless ``allow_pickle=True``. ``write_safetensors_checkpoint`` writes
the same layout tensor by tensor (merged exports, tiny test models).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from ..errors import CheckpointError

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors_header(path: Path) -> tuple[int, dict]:
    """(byte offset of the data section, header dict) of one .safetensors file."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    header.pop("__metadata__", None)
    needed = 8 + n + max((int(m["data_offsets"][1]) for m in header.values()
                          if isinstance(m, dict) and "data_offsets" in m), default=0)
    size = path.stat().st_size
    if size < needed:
        raise CheckpointError(f"{path} is truncated: {size} bytes, its header needs {needed}; "
                              f"copy or download it again")
    return 8 + n, header


class WeightFiles:
    """Tensor name -> lazily memory-mapped numpy array, across the files of a checkpoint."""

    def __init__(self, model_dir, allow_pickle: bool = False):
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise CheckpointError(f"model directory not found: {self.dir}")
        self._entries: dict[str, tuple[Path, int, dict]] = {}
        self._eager: dict[str, np.ndarray] = {}
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: malformed index ({e})") from None
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            files = [single.name]
        else:
            files = []
        if files:
            for name in files:
                path = self.dir / name
                if not path.is_file():
                    raise CheckpointError(f"{path} is listed in {index.name} but missing; "
                                          f"re-download or re-save the checkpoint")
                offset, header = read_safetensors_header(path)
                for key, meta in header.items():
                    self._entries[key] = (path, offset, meta)
            return
        bins = sorted(self.dir.glob("pytorch_model*.bin"))
        if bins and not allow_pickle:
            raise CheckpointError(
                f"{self.dir} holds only pickle .bin weights, which can execute code when loaded. "
                f"Convert them to safetensors, or pass allow_pickle=True (--allow-pickle) if you "
                f"trust the source")
        if not bins:
            raise CheckpointError(f"{self.dir}: no model.safetensors, model.safetensors.index.json "
                                  f"or pytorch_model*.bin found")
        import torch  # optional: only for trusted pickle checkpoints
        for path in bins:
            for key, t in torch.load(path, map_location="cpu", weights_only=True).items():
                self._eager[key] = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()

    def names(self) -> set[str]:
        return set(self._entries) | set(self._eager)

    def __contains__(self, name: str) -> bool:
        return name in self._entries or name in self._eager

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._eager:
            return tuple(self._eager[name].shape)
        return tuple(self._entry(name)[2]["shape"])

    def _entry(self, name):
        if name not in self._entries:
            raise CheckpointError(f"{self.dir}: tensor {name!r} missing from the checkpoint")
        return self._entries[name]

    def get(self, name: str) -> np.ndarray:
        """A read-only memory map of the whole tensor (no bytes read until sliced)."""
        if name in self._eager:
            return self._eager[name]
        path, base, meta = self._entry(name)
        dtype = SAFETENSORS_DTYPES.get(meta["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {meta['dtype']}")
        start, end = meta["data_offsets"]
        shape = tuple(meta["shape"])
        if end - start != int(np.prod(shape)) * np.dtype(dtype).itemsize:
            raise CheckpointError(f"{path}: tensor {name!r} byte size does not match its shape")
        if end == start:
            return np.zeros(shape, dtype)
        return np.memmap(path, dtype=dtype, mode="r", offset=base + start, shape=shape)

    def expect_shape(self, name: str, shape: tuple[int, ...]) -> None:
        found = self.shape(name)
        if found != tuple(shape):
            raise CheckpointError(
                f"{self.dir}: tensor {name!r} has shape {list(found)}, config.json implies "
                f"{list(shape)}; the weights do not match the config")


# ----------------------------------------------------------------------------- writing

_DTYPE_NAMES = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
               "GIB": 2**30}


def parse_size(size) -> int:
    """Bytes from an int or a HF-style size string ("200KB", "5GB", "10MiB")."""
    if isinstance(size, int):
        return size
    text = str(size).strip().upper()
    for unit in sorted(_SIZE_UNITS, key=len, reverse=True):
        if text.endswith(unit):
            try:
                return int(float(text[:-len(unit)]) * _SIZE_UNITS[unit])
            except ValueError:
                break
    raise CheckpointError(f"max_shard_size {size!r} is not a size like 200KB, 5GB or 10MiB")


def _plan_shards(names, nbytes, max_shard_size):
    """Greedy split of ``names`` (in order) into shards of at most ``max_shard_size`` bytes
    (a tensor larger than that gets a shard of its own)."""
    shards, current, size = [], [], 0
    for n in names:
        if current and size + nbytes[n] > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(n)
        size += nbytes[n]
    if current:
        shards.append(current)
    return shards


def _write_shard(path: Path, names, shapes, dtypes, produce) -> None:
    """Write one safetensors file, producing each tensor only while it is written."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for n in names:
        size = int(np.prod(shapes[n])) * dtypes[n].itemsize
        header[n] = {"dtype": _DTYPE_NAMES[dtypes[n]], "shape": list(shapes[n]),
                     "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((-len(blob)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for n in names:
            t = np.ascontiguousarray(produce(n))
            if t.shape != tuple(shapes[n]) or t.dtype != dtypes[n]:
                raise CheckpointError(f"internal: {n} produced {t.dtype}{list(t.shape)}")
            f.write(memoryview(t.reshape(-1).view(np.uint8)))
            del t


def write_safetensors_checkpoint(out_dir, names, shapes, dtypes, produce, max_shard_size) -> None:
    """Write tensors ``names`` (in that order) into ``out_dir`` as ``model.safetensors``, or as
    ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json`` when they exceed
    ``max_shard_size`` (bytes or "200KB"-style). ``produce(name)`` returns the numpy array of
    ``shapes[name]`` / ``dtypes[name]``; it is called once per tensor, while that tensor is
    written, so at most one tensor is in memory at a time."""
    out = Path(out_dir)
    for n in names:
        if np.dtype(dtypes[n]) not in _DTYPE_NAMES:
            raise CheckpointError(f"tensor {n!r} has dtype {dtypes[n]}, which safetensors cannot hold")
    dtypes = {n: np.dtype(dtypes[n]) for n in names}
    nbytes = {n: int(np.prod(shapes[n])) * dtypes[n].itemsize for n in names}
    shards = _plan_shards(names, nbytes, parse_size(max_shard_size))
    if len(shards) == 1:
        _write_shard(out / "model.safetensors", shards[0], shapes, dtypes, produce)
        return
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(out / fname, shard, shapes, dtypes, produce)
        weight_map.update({n: fname for n in shard})
    index = {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
