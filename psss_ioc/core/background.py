"""Background image files: HDF5 (dataset ``/image``, as the legacy service wrote them) or ``.npy``.

Reading validates and raises `BackgroundError` with a message an operator can act on
(missing file, unreadable, not HDF5, no ``/image`` dataset, not 2-D, wrong shape, outside the
allowed directories).
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

HDF5_DATASET = "image"
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".nxs")
# The largest background read when the frames' shape is not known yet: 8192 x 8192 float32
# (the camera's frame is 2016 x 2560). Checked from the file's header, before any allocation.
MAX_BYTES = 256 * 2**20


class BackgroundError(ValueError):
    """A background file that cannot be used; the message says why."""


def confine(path: str | Path, allowed: Sequence[str | Path]) -> Path:
    """The real path of `path` (``..`` and symlinks resolved) if it lies inside one of the
    `allowed` directories; BackgroundError saying why otherwise.

    Relative paths are taken relative to the working directory, as when the file is opened.
    """
    text = str(path)
    if "\x00" in text:
        raise BackgroundError("background file name must not contain a NUL character")
    roots = [Path(os.path.realpath(d)) for d in allowed]
    real = Path(os.path.realpath(text))
    if any(real.is_relative_to(root) for root in roots):
        return real
    where = ", ".join(str(r) for r in roots) or "none configured"
    lexical = Path(os.path.abspath(text))  # `..` removed by name, symlinks not followed
    if ".." in Path(text).parts:
        how = "its '..' leads out of them"
    elif any(lexical.is_relative_to(root) for root in roots):
        how = f"a symlink leads out of them (to {real})"
    else:
        how = "it is outside them"
    raise BackgroundError(f"background file {text} is not allowed: {how}; allowed "
                          f"directories: {where} (psss-ioc run --background-path)")


def load(path: str | Path, shape: tuple[int, int] | None = None,
         allowed: Sequence[str | Path] | None = None) -> np.ndarray:
    """Read a background image; `shape` (rows, columns), when given, must match.

    `.npy` files are read with numpy, everything else as HDF5 (dataset ``/image``). With
    `allowed` (directories), the file must lie inside one of them (see `confine`); the file
    read is then the resolved one, so a link swapped after the check is not followed.
    """
    p = Path(path)
    if not str(path).strip():
        raise BackgroundError("no background file given")
    if allowed is not None:
        p = confine(path, allowed)
    with _open_regular(p) as f:
        try:
            if p.suffix.lower() == ".npy":
                image = _read_npy(f, p, shape)
            else:
                image = _read_hdf5(f, p, shape)
        except MemoryError:
            raise BackgroundError(f"background file {p} is too large to read") from None
    return validate(image, shape, source=str(p))


def _open_regular(p: Path) -> io.BufferedReader:
    """The file opened for reading, refused unless it is a regular file *as opened*: a FIFO or
    device would block or never end, and a path swapped for one after a check is caught here
    (non-blocking open, then fstat of what was opened; a final symlink is not followed)."""
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise BackgroundError(f"background file {p} does not exist") from None
    except OSError as e:
        raise BackgroundError(f"background file {p} cannot be opened: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BackgroundError(f"background file {p} is not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _check_header(p: Path, shape: tuple[int, ...], dtype: np.dtype,
                  expected: tuple[int, int] | None, available: int | None) -> None:
    """Refuse what the header of a file claims, before reading it: not a 2-D numeric image,
    not the frames' shape, more than MAX_BYTES, or more data than the file holds."""
    if len(shape) != 2:
        raise BackgroundError(f"{p}: image must be 2-D, got shape {shape}")
    if dtype.kind not in "uif":
        raise BackgroundError(f"{p}: image must be numeric, got dtype {dtype}")
    if expected is not None and tuple(shape) != tuple(expected):
        raise BackgroundError(f"{p}: shape {shape[0]} x {shape[1]} does not match the image "
                              f"{expected[0]} x {expected[1]}")
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if nbytes > MAX_BYTES:
        raise BackgroundError(f"{p}: a {shape[0]} x {shape[1]} {dtype} image is "
                              f"{nbytes / 2**20:.0f} MiB, more than the {MAX_BYTES >> 20} MiB "
                              "a background may have")
    if available is not None and nbytes > available:
        raise BackgroundError(f"{p}: its header claims {nbytes} bytes of data but the file "
                              f"holds {available}")


def validate(
    image: np.ndarray, shape: tuple[int, int] | None = None, source: str = "background"
) -> np.ndarray:
    """Check a background array: 2-D, numeric, finite, of `shape` if given."""
    image = np.asarray(image)
    if image.ndim != 2:
        raise BackgroundError(f"{source}: image must be 2-D, got shape {image.shape}")
    if image.size == 0:
        raise BackgroundError(f"{source}: image is empty")
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise BackgroundError(f"{source}: image must be numeric, got dtype {image.dtype}")
    if np.issubdtype(image.dtype, np.floating) and not np.all(np.isfinite(image)):
        raise BackgroundError(f"{source}: image contains NaN or infinite values")
    if shape is not None and tuple(image.shape) != tuple(shape):
        raise BackgroundError(
            f"{source}: shape {image.shape[0]} x {image.shape[1]} does not match the image "
            f"{shape[0]} x {shape[1]}"
        )
    return image


def save(path: str | Path, image: np.ndarray) -> Path:
    """Write a background image (validated) as `.npy` or HDF5 ``/image``, by suffix."""
    p = Path(path)
    image = validate(image, source=str(p))
    if p.suffix.lower() == ".npy":
        np.save(p, image)
    else:
        with h5py.File(p, "w") as f:
            f.create_dataset(HDF5_DATASET, data=image)
    return p


def _read_npy(f: io.BufferedReader, p: Path, expected: tuple[int, int] | None) -> np.ndarray:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        header = (fmt.read_array_header_1_0 if version == (1, 0)
                  else fmt.read_array_header_2_0)(f)
        shape, _, dtype = header
        _check_header(p, shape, np.dtype(dtype), expected,
                      os.fstat(f.fileno()).st_size - f.tell())
        f.seek(0)
        return fmt.read_array(f, allow_pickle=False)
    except BackgroundError:
        raise
    except (OSError, ValueError, EOFError, TypeError) as e:
        raise BackgroundError(f"background file {p} is not a readable .npy file: {e}") from e


def _read_hdf5(f: io.BufferedReader, p: Path, expected: tuple[int, int] | None) -> np.ndarray:
    if not _has_hdf5_signature(f):
        raise BackgroundError(f"background file {p} is not an HDF5 file")
    try:
        with h5py.File(f, "r") as h5:
            if HDF5_DATASET not in h5:
                raise BackgroundError(f"background file {p} has no /{HDF5_DATASET} dataset")
            dataset = h5[HDF5_DATASET]
            if not isinstance(dataset, h5py.Dataset):
                raise BackgroundError(f"background file {p}: /{HDF5_DATASET} is not a dataset")
            # a compressed dataset may hold less than its shape: the cap bounds what it unpacks
            _check_header(p, dataset.shape, dataset.dtype, expected, None)
            return dataset[()]
    except BackgroundError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise BackgroundError(f"background file {p} is unreadable: {e}") from e


def _has_hdf5_signature(f: io.BufferedReader) -> bool:
    """The HDF5 signature at 0, 512, 1024, ... (after a user block), as HDF5 looks for it."""
    size = os.fstat(f.fileno()).st_size
    offset = 0
    while offset + 8 <= size:
        f.seek(offset)
        if f.read(8) == b"\x89HDF\r\n\x1a\n":
            f.seek(0)
            return True
        offset = 512 if offset == 0 else offset * 2
    return False
