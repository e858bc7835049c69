"""Background images and their files: the one place that says what a usable background is.

- `validate`: the one set of rules and messages for a background image: 2-D, non-empty,
  numeric, finite, of the frames' shape when that is known; with ``uint16=True`` (what the
  REST API stores for the camera's uint16 frames) also whole numbers within 0..65535.
- Files: `load` (HDF5 dataset ``/image``, as the legacy service wrote them, or ``.npy``;
  confined to the allowed directories; headers checked before anything is read), `save`
  (atomic) and `uploaded_name` (the name an uploaded file was sent under, kept in the file).
- Uploads (POST /background): `background_array` (the legacy ``data`` rows, or a decoded
  array, as a checked uint16 image), `is_binary` and `decode_binary` (a ``.npy`` or HDF5
  body), `write_background` (stored under a new `stored_name`), `prune_uploads`.

Every refusal is a `BackgroundError` (a ValueError) with a message an operator can act on.
"""

from __future__ import annotations

import datetime
import io
import logging
import os
import re
import stat
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

log = logging.getLogger(__name__)

HDF5_DATASET = "image"
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".nxs")
NPY_MAGIC = b"\x93NUMPY"
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
# The HDF5 attribute (on the file) that keeps the name a background was uploaded under.
UPLOADED_NAME = "psss_uploaded_name"
UINT16_MAX = 65535  # the camera's frames are uint16
# The largest background read when the frames' shape is not known yet: 8192 x 8192 float32
# (the camera's frame is 2016 x 2560). Checked from the file's header, before any allocation.
MAX_BYTES = 256 * 2**20
KEEP_UPLOADS = 10
# what `stored_name` makes: other files in the directory (an operator's own) are never pruned
_STORED_NAME = re.compile(r".+_\d{8}_\d{6}_[0-9a-f]{8}\.h5")


class BackgroundError(ValueError):
    """A background (array or file) that cannot be used; the message says why."""


# ------------------------------------------------------------------------------ the rules
def validate(image: Any, shape: tuple[int, int] | None = None, source: str = "background",
             *, uint16: bool = False) -> np.ndarray:
    """The array of a usable background; BackgroundError saying why `image` is not one.

    A background is 2-D, not empty, numeric (integer or floating point; not true/false,
    strings or objects), finite, and of `shape` (rows, columns) when that is given. With
    `uint16` it must also hold whole numbers within 0..65535, and comes back as uint16 (a copy);
    otherwise it comes back as given (``np.asarray``). `source` names it in the messages.
    """
    image = np.asarray(image)
    _check_form(source, image.shape, image.dtype)
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise BackgroundError(f"{source} contains NaN or infinite values")
    if uint16:
        if image.dtype.kind == "f" and not np.array_equal(image, np.floor(image)):
            raise BackgroundError(f"{source} must be whole numbers (the camera's frames are "
                                  "uint16)")
        low, high = image.min(), image.max()
        if low < 0 or high > UINT16_MAX:
            raise BackgroundError(f"{source} values must be within 0..{UINT16_MAX}, "
                                  f"got {_number(low)}..{_number(high)}")
    _check_shape(source, image.shape, shape)
    return image.astype(np.uint16) if uint16 else image


def _check_form(source: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """2-D, not empty, numeric: what an array, or a file's header, must say."""
    if len(shape) != 2:
        raise BackgroundError(f"{source} must be 2-D (rows of numbers), got {len(shape)} "
                              f"dimension(s) of shape {list(shape)}")
    if shape[0] * shape[1] == 0:
        raise BackgroundError(f"{source} is empty")
    if dtype.kind not in "uif":
        names = {"b": "true/false values", "U": "strings", "S": "strings",
                 "O": "mixed or non-numeric values"}
        raise BackgroundError(f"{source} must be numeric (numbers), got "
                              f"{names.get(dtype.kind, f'dtype {dtype}')}")


def _check_shape(source: str, shape: tuple[int, ...], expected: tuple[int, int] | None) -> None:
    if expected is not None and tuple(shape) != tuple(expected):
        raise BackgroundError(f"{source} has the wrong shape: {shape[0]} x {shape[1]} does not "
                              f"match the image {expected[0]} x {expected[1]}")


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float | np.floating) else str(value)


# ------------------------------------------------------------------------------ files
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
    return validate(image, shape, source=f"background file {p}")


def save(path: str | Path, image: np.ndarray, uploaded_name: str | None = None) -> Path:
    """Write a background image (validated) as ``.npy`` or, any other suffix, HDF5 ``/image``
    with `uploaded_name` (if given) in the `UPLOADED_NAME` attribute: it stays with the file.

    Atomic: written to ``<path>.part``, then renamed, so a reader never sees half a file.
    """
    p = Path(path)
    image = validate(image, source=f"background file {p}")
    npy = p.suffix.lower() == ".npy"
    if npy and uploaded_name is not None:
        raise BackgroundError(f"background file {p}: a .npy file cannot keep the uploaded "
                              "name; save it as HDF5")
    part = p.with_name(p.name + ".part")
    try:
        if npy:
            with open(part, "wb") as f:
                np.save(f, image, allow_pickle=False)
        else:
            with h5py.File(part, "w") as f:
                f.create_dataset(HDF5_DATASET, data=image)
                if uploaded_name is not None:
                    f.attrs[UPLOADED_NAME] = uploaded_name
        os.replace(part, p)
    finally:
        part.unlink(missing_ok=True)
    return p


def uploaded_name(path: str | Path) -> str | None:
    """The name the background file at `path` was uploaded under, None if none is kept."""
    try:
        with h5py.File(path, "r") as f:
            name = f.attrs.get(UPLOADED_NAME)
    except Exception:  # not HDF5, gone, unreadable: no uploaded name
        return None
    if isinstance(name, bytes):
        name = name.decode(errors="replace")
    return name if isinstance(name, str) else None


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
    """Refuse what the header of a file claims, before reading it: not a 2-D numeric image
    (the rules of `validate`), not the frames' shape, more than MAX_BYTES, or more data than
    the file holds."""
    source = f"background file {p}"
    _check_form(source, shape, dtype)
    _check_shape(source, shape, expected)
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if nbytes > MAX_BYTES:
        raise BackgroundError(f"{p}: a {shape[0]} x {shape[1]} {dtype} image is "
                              f"{nbytes / 2**20:.0f} MiB, more than the {MAX_BYTES >> 20} MiB "
                              "a background may have")
    if available is not None and nbytes > available:
        raise BackgroundError(f"{p}: its header claims {nbytes} bytes of data but the file "
                              f"holds {available}")


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
        if f.read(8) == HDF5_MAGIC:
            f.seek(0)
            return True
        offset = 512 if offset == 0 else offset * 2
    return False


# ------------------------------------------------------------------------------ uploads
def background_array(data: Any, shape: tuple[int, int] | None) -> np.ndarray:
    """The legacy ``data`` (rows of whole numbers) or a decoded array as a checked uint16 image.

    Refuses (BackgroundError) anything that is not a list of rows or an array, and what
    `validate` with ``uint16=True`` refuses: not 2-D, not numeric, not whole numbers in
    0..65535, or not of `shape` (the current image shape) when that is known.
    """
    if isinstance(data, np.ndarray):
        array = data
    elif isinstance(data, list):
        try:
            array = np.array(data)
        except (ValueError, TypeError, OverflowError) as e:
            raise BackgroundError(f"background data must be rows of equal length: {e}") from None
    else:
        raise BackgroundError("background data must be a list of rows, not "
                              f"{type(data).__name__}")
    return validate(array, shape, source="background data", uint16=True)


def is_binary(body: bytes) -> bool:
    """Whether an upload's body starts as a ``.npy`` or an HDF5 file does."""
    return body.startswith(NPY_MAGIC) or body.startswith(HDF5_MAGIC)


def decode_binary(body: bytes) -> np.ndarray:
    """A ``.npy`` or HDF5 (dataset /image) body as an array; BackgroundError if unreadable."""
    try:
        if body.startswith(NPY_MAGIC):
            return np.load(io.BytesIO(body), allow_pickle=False)
        with h5py.File(io.BytesIO(body), "r") as f:
            dataset = f.get(HDF5_DATASET)
            if not isinstance(dataset, h5py.Dataset):
                raise BackgroundError(f"HDF5 body has no /{HDF5_DATASET} dataset")
            return dataset[()]
    except BackgroundError:
        raise
    except Exception as e:  # numpy and h5py raise many kinds on corrupt input
        raise BackgroundError(f"binary body is not a readable .npy or HDF5 file: {e}") from None


def stored_name(original: str) -> str:
    """A new unique file name for an uploaded background, keeping the original's stem."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(original).stem if original else "")[:60]
    stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    return f"{stem or 'background'}_{stamp}_{uuid.uuid4().hex[:8]}.h5"


def write_background(directory: Path, original: str, image: np.ndarray) -> Path:
    """Store an uploaded `image` in `directory` under a new `stored_name`, as HDF5 ``/image``
    with the name it was uploaded under (GET /parameters shows that one); atomic (`save`)."""
    directory.mkdir(parents=True, exist_ok=True)
    return save(directory / stored_name(original), image, uploaded_name=original).resolve()


def prune_uploads(directory: Path, in_use: str, keep: int = KEEP_UPLOADS) -> list[Path]:
    """Delete uploaded backgrounds but the one in use and the `keep` newest; returns those
    deleted. Uploads pile up otherwise: each is a full frame (10 MB for the camera)."""
    uploads = [p for p in directory.glob("*.h5") if _STORED_NAME.fullmatch(p.name)]
    uploads.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    removed = []
    for path in uploads[keep:]:
        if str(path.resolve()) == in_use:
            continue
        try:
            path.unlink()
            removed.append(path)
        except OSError as e:
            log.warning("could not remove the old upload %s: %s", path, e)
    return removed
