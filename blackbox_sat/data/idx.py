"""IDX files (the MNIST format) and where the Fashion-MNIST files are found; nothing is ever
downloaded at run time. :mod:`blackbox_sat.data.tasks` splits them into a task.

**Fashion-MNIST** is read from, in this order: the ``data_dir`` argument, the folder named by
``$BLACKBOX_SAT_DATA`` or its ``fashion-mnist`` subfolder, and Debian's
``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``). The files are
``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
``t10k-labels-idx1-ubyte``, each optionally gzipped (``.gz``).
"""

from __future__ import annotations

import functools
import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from blackbox_sat.devices.contract import InvalidInput

#: Environment variable naming a folder with the data files (or a ``fashion-mnist`` subfolder).
DATA_ENV = "BLACKBOX_SAT_DATA"
#: Where Debian's ``dataset-fashion-mnist`` package puts the files (gzipped).
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
#: System folders searched after ``$BLACKBOX_SAT_DATA`` (tests replace this).
SYSTEM_FASHION_MNIST_DIRS: tuple[Path, ...] = (DEBIAN_FASHION_MNIST_DIR,)
FASHION_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
FASHION_INSTALL_HINT = (
    "Install Debian's package with `apt-get install dataset-fashion-mnist` (files land in "
    f"{DEBIAN_FASHION_MNIST_DIR}), or put the four files (optionally .gz) in a folder and set "
    f"{DATA_ENV}=/that/folder (a `fashion-mnist` subfolder of it also works)."
)


class IDXFormatError(InvalidInput):
    """A file is not a valid IDX file (bad magic number, truncated, corrupt gzip...)."""


_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), plain or gzipped, into a native-endian array.

    Layout: two zero bytes, a type byte (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions, then each dimension as a
    big-endian uint32, then the data, big-endian, row-major. A gzipped file is recognized by
    its own magic bytes, whatever its name. Raises :class:`IDXFormatError` on a bad magic
    number, a truncated file, trailing bytes or a corrupt gzip stream.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise IDXFormatError(f"{path}: corrupt gzip stream ({exc})") from exc
    if len(raw) < 4:
        raise IDXFormatError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    zero0, zero1, type_code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0 or type_code not in _IDX_DTYPES:
        raise IDXFormatError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()} (expected 0x0000TTNN with type "
            f"TT in {{{', '.join(f'{k:02x}' for k in _IDX_DTYPES)}}} and NN dimensions)"
        )
    if ndim == 0:
        raise IDXFormatError(f"{path}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IDXFormatError(f"{path}: truncated IDX header ({len(raw)} of {header} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(raw) - header
    if got != expected:
        what = "truncated" if got < expected else "has trailing bytes"
        raise IDXFormatError(
            f"{path}: IDX data {what}: dims {dims} of {dtype.itemsize}-byte items need "
            f"{expected} bytes after the header, found {got}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="), copy=True)


def fashion_mnist_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The folders searched for Fashion-MNIST, in order."""
    dirs: list[Path] = []
    if data_dir is not None:
        dirs += [Path(data_dir), Path(data_dir) / "fashion-mnist"]
    env = os.environ.get(DATA_ENV)
    if env:
        dirs += [Path(env), Path(env) / "fashion-mnist"]
    dirs += list(SYSTEM_FASHION_MNIST_DIRS)
    return dirs


def find_idx(folder: Path, base: str) -> Path | None:
    for candidate in (folder / base, folder / (base + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def find_fashion_mnist(data_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Paths of the four Fashion-MNIST files, from the first folder that has all four.

    Raises FileNotFoundError, saying where it looked and how to install the data.
    """
    searched = []
    for folder in fashion_mnist_dirs(data_dir):
        found = {k: find_idx(folder, base) for k, base in FASHION_FILES.items()}
        if all(found.values()):
            return found  # type: ignore[return-value]
        if folder.is_dir():
            missing = [FASHION_FILES[k] for k, v in found.items() if v is None]
            searched.append(f"{folder} (missing {', '.join(missing)})")
        else:
            searched.append(f"{folder} (no such folder)")
    raise FileNotFoundError(
        "Fashion-MNIST data not found; nothing is downloaded at run time. Searched: "
        + "; ".join(searched)
        + ". "
        + FASHION_INSTALL_HINT
    )


@functools.lru_cache(maxsize=1)
def read_fashion_files(stamp: tuple) -> dict:
    """The four IDX arrays (read-only), keyed by ``(key, path, mtime)`` of each file."""
    arr = {k: read_idx(p) for k, p, _ in stamp}
    for a in arr.values():
        a.setflags(write=False)
    return arr
