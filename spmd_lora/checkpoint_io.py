"""Reading HF weight files slice by slice.

``WeightFiles`` indexes a model directory (``model.safetensors``, or a sharded set listed in
``model.safetensors.index.json``) and hands out memory-mapped numpy views, so reading one
device's shard touches only those bytes. Pickle ``.bin`` checkpoints can run arbitrary code when
loaded and are refused unless ``allow_pickle=True``.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from .errors import CheckpointError

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
