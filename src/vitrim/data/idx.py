"""Reading IDX files (the MNIST format), plain or gzip-compressed, with strict validation."""

from __future__ import annotations

import gzip
import hashlib
import math
from pathlib import Path

import numpy as np
import torch

from vitrim.errors import DataError

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx_bytes(path: Path) -> bytes:
    """Raw (decompressed) bytes of an IDX file; ``.gz`` files are decompressed.

    The header is read first: a file whose header claims more data than this machine's RAM is
    refused before it is decompressed, and nothing past the size the header gives is read.
    """
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as fh:
            head = fh.read(4)
            if len(head) < 4 or head[0] or head[1] or head[2] not in _IDX_DTYPES:
                return head + fh.read(1 << 20)  # parse_idx names the problem
            head += fh.read(4 * head[3])
            size = _declared_size(head, path)
            return head + fh.read(size - len(head) + 1)  # one byte more shows trailing data
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}; the file is truncated or corrupt, "
                        f"obtain a fresh copy") from None


def _declared_size(head: bytes, source: Path | str) -> int:
    """Total bytes (header + data) the IDX header ``head`` declares, refused beyond RAM."""
    from vitrim.limits import human_bytes, physical_ram

    ndim = head[3]
    shape = tuple(int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    size = 4 + 4 * ndim + math.prod(shape) * np.dtype(_IDX_DTYPES[head[2]]).itemsize
    ram = physical_ram()
    if size > ram:
        raise DataError(f"{source}: its header claims shape {shape} ({human_bytes(size)}), more than this "
                        f"machine's {human_bytes(ram)} of RAM; the file is corrupt or not a data set vitrim "
                        f"can hold, obtain a fresh copy")
    return size


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
    expected = _declared_size(data[:header], source)
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
