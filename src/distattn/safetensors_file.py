"""One safetensors file read with plain positioned reads: each tensor (or a slice of it) lands in memory once.

safetensors' own reader memory-maps the file: every page a load touches stays resident in the
process until the file is closed, so a loader that copies tensors into its own parameters peaks at
twice the checkpoint. Here a read is `os.preadv` straight into a fresh tensor's storage (the page
cache keeps the file, not this process): a load peaks at its parameters plus the tensor in flight.
A slice along dim 0 reads only its rows; a slice along another dim reads its rows in blocks and keeps
the slice (a tensor-parallel rank's column shard).

Format: 8 bytes little-endian header length N, N bytes of JSON (name -> dtype, shape, [begin, end)
byte offsets into the data that follows; "__metadata__"), then the data.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
BLOCK_BYTES = 64 << 20  # rows read at once for a slice along dim > 0


class SafetensorsFile:
    """The tensors of one .safetensors file (header read at open; ValueError naming the file if it is not one)."""

    def __init__(self, path: str | Path) -> None:
        self.path, self.fd = Path(path), -1
        self.fd = os.open(self.path, os.O_RDONLY)
        try:
            size = os.fstat(self.fd).st_size
            (header_len,) = struct.unpack("<Q", os.pread(self.fd, 8, 0)) if size >= 8 else (-1,)
            if not 0 < header_len <= size - 8:
                raise ValueError("the header length does not fit the file")
            self.header = json.loads(os.pread(self.fd, header_len, 8))
            self.header.pop("__metadata__", None)
            self.data_start = 8 + header_len
            for name, entry in self.header.items():
                begin, end = entry["data_offsets"]
                expected = math.prod(entry["shape"]) * DTYPES[entry["dtype"]].itemsize
                if end - begin != expected or self.data_start + end > size:
                    raise ValueError(f"tensor {name!r} lies beyond the end of the file or has the wrong size")
        except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as err:
            self.close()
            raise ValueError(f"checkpoint file {str(self.path)!r} cannot be read ({type(err).__name__}: {err}); it is truncated or "
                             "corrupt: save or copy it again") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def dtype_name(self, name: str) -> str:
        """The dtype as the header names it ("BF16", "F32", "I8", ...)."""
        return str(self.header[name]["dtype"])

    def read(self, name: str, dim: int = 0, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """The tensor, or its [start, stop) slice along `dim`, in a fresh tensor of its own."""
        entry = self.header[name]
        shape, dtype = list(entry["shape"]), DTYPES[entry["dtype"]]
        offset = self.data_start + entry["data_offsets"][0]
        if start is None or stop is None or (shape and start == 0 and stop == shape[dim]):  # the whole tensor
            start, stop, dim = 0, shape[0] if shape else 1, 0
        if not shape:  # a scalar
            return self._bytes(offset, dtype.itemsize).view(dtype).reshape(())
        row = math.prod(shape[1:]) * dtype.itemsize  # bytes of one index along dim 0
        if dim == 0:
            out = self._bytes(offset + start * row, (stop - start) * row)
            return out.view(dtype).reshape(stop - start, *shape[1:])
        out = torch.empty(shape[:dim] + [stop - start] + shape[dim + 1 :], dtype=dtype)
        rows = max(1, BLOCK_BYTES // max(row, 1))
        for first in range(0, shape[0], rows):
            last = min(first + rows, shape[0])
            block = self._bytes(offset + first * row, (last - first) * row).view(dtype).reshape(last - first, *shape[1:])
            out[first:last] = block.narrow(dim, start, stop - start)
        return out

    def _bytes(self, offset: int, count: int) -> torch.Tensor:
        """`count` bytes of the file from `offset`, as a uint8 tensor."""
        out = torch.empty(count, dtype=torch.uint8)
        view = out.numpy().data if count else memoryview(b"")
        done = 0
        while done < count:
            got = os.preadv(self.fd, [view[done:]], offset + done)
            if got <= 0:
                raise ValueError(f"checkpoint file {str(self.path)!r} ended early at byte {offset + done}; it is truncated: copy it again")
            done += got
        return out
