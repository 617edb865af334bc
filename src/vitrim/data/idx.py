"""Reading IDX files (the MNIST format), plain or gzip-compressed, with strict validation."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import torch

from vitrim.errors import DataError

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx_bytes(path: Path) -> bytes:
    """Raw (decompressed) bytes of an IDX file; ``.gz`` files are decompressed."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}; the file is truncated or corrupt, "
                        f"obtain a fresh copy") from None


def parse_idx(data: bytes, source: Path | str = "<bytes>") -> torch.Tensor:
    """Parse IDX bytes into a tensor of the stored shape."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{source} is not an IDX file (bad magic number)")
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{source} is truncated: header needs {header} bytes, file has {len(data)}")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise DataError(
            f"{source} is truncated or corrupt: shape {shape} needs {expected} bytes, "
            f"file has {len(data)}; obtain a fresh copy"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return torch.from_numpy(array.astype(dtype.newbyteorder("=")).copy())


def read_idx(path: Path, sha256: str | None = None) -> torch.Tensor:
    data = read_idx_bytes(path)
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise DataError(f"{path} has the wrong checksum (corrupt or a different dataset); "
                        f"delete it and obtain a fresh copy")
    return parse_idx(data, path)


def find_idx_file(directory: Path, stem: str) -> Path | None:
    """``stem`` as stored (``train-images-idx3-ubyte``), gzip'd or plain, in ``directory``."""
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        candidate = directory / name
        if candidate.is_file():
            return candidate
    return None
