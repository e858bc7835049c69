"""Background image files: HDF5 (dataset ``/image``, as the legacy service wrote them) or ``.npy``.

Reading validates and raises `BackgroundError` with a message an operator can act on
(missing file, unreadable, not HDF5, no ``/image`` dataset, not 2-D, wrong shape, outside the
allowed directories).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

HDF5_DATASET = "image"
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".nxs")


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
    if not p.exists():
        raise BackgroundError(f"background file {p} does not exist")
    if not p.is_file():
        raise BackgroundError(f"background file {p} is not a regular file")
    image = _read_npy(p) if p.suffix.lower() == ".npy" else _read_hdf5(p)
    return validate(image, shape, source=str(p))


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


def _read_npy(p: Path) -> np.ndarray:
    try:
        return np.load(p, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise BackgroundError(f"background file {p} is not a readable .npy file: {e}") from e


def _read_hdf5(p: Path) -> np.ndarray:
    if not h5py.is_hdf5(p):
        raise BackgroundError(f"background file {p} is not an HDF5 file")
    try:
        with h5py.File(p, "r") as f:
            if HDF5_DATASET not in f:
                raise BackgroundError(f"background file {p} has no /{HDF5_DATASET} dataset")
            dataset = f[HDF5_DATASET]
            if not isinstance(dataset, h5py.Dataset):
                raise BackgroundError(f"background file {p}: /{HDF5_DATASET} is not a dataset")
            return dataset[()]
    except BackgroundError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise BackgroundError(f"background file {p} is unreadable: {e}") from e
