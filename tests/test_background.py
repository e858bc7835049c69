"""Background files: round trips and every kind of bad file, with the message it gives."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from psss_ioc.core import background
from psss_ioc.core.background import BackgroundError


@pytest.fixture
def image() -> np.ndarray:
    return np.arange(12 * 7, dtype=np.uint16).reshape(12, 7)


@pytest.mark.parametrize("name", ["bg.h5", "bg.npy", "bg.hdf5"])
def test_round_trip(tmp_path: Path, image: np.ndarray, name: str) -> None:
    path = background.save(tmp_path / name, image)
    loaded = background.load(path, shape=(12, 7))
    np.testing.assert_array_equal(loaded, image)
    assert loaded.dtype == image.dtype


def test_legacy_hdf5_layout_is_read(tmp_path: Path, image: np.ndarray) -> None:
    path = tmp_path / "background_20190203_141516.h5"
    with h5py.File(path, "w") as f:
        f["/image"] = image
    np.testing.assert_array_equal(background.load(path), image)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BackgroundError, match="does not exist"):
        background.load(tmp_path / "nope.h5")


def test_empty_name() -> None:
    with pytest.raises(BackgroundError, match="no background file"):
        background.load("")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(BackgroundError, match="not a regular file"):
        background.load(tmp_path)


def test_not_hdf5(tmp_path: Path) -> None:
    path = tmp_path / "bg.h5"
    path.write_text("this is not HDF5")
    with pytest.raises(BackgroundError, match="not an HDF5 file"):
        background.load(path)


def test_hdf5_without_image(tmp_path: Path, image: np.ndarray) -> None:
    path = tmp_path / "bg.h5"
    with h5py.File(path, "w") as f:
        f["/data"] = image
    with pytest.raises(BackgroundError, match="no /image dataset"):
        background.load(path)


def test_hdf5_image_is_a_group(tmp_path: Path) -> None:
    path = tmp_path / "bg.h5"
    with h5py.File(path, "w") as f:
        f.create_group("image")
    with pytest.raises(BackgroundError, match="not a dataset"):
        background.load(path)


def test_corrupt_npy(tmp_path: Path) -> None:
    path = tmp_path / "bg.npy"
    path.write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(BackgroundError, match=r"not a readable \.npy"):
        background.load(path)


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4)])
def test_not_2d(tmp_path: Path, shape: tuple[int, ...]) -> None:
    path = tmp_path / "bg.npy"
    np.save(path, np.zeros(shape))
    with pytest.raises(BackgroundError, match="must be 2-D"):
        background.load(path)


def test_wrong_shape(tmp_path: Path, image: np.ndarray) -> None:
    path = background.save(tmp_path / "bg.h5", image)
    with pytest.raises(BackgroundError, match="12 x 7 does not match the image 10 x 7"):
        background.load(path, shape=(10, 7))


def test_non_finite(tmp_path: Path) -> None:
    path = tmp_path / "bg.npy"
    bad = np.zeros((3, 3))
    bad[1, 1] = np.nan
    np.save(path, bad)
    with pytest.raises(BackgroundError, match="NaN"):
        background.load(path)


def test_not_numeric(tmp_path: Path) -> None:
    path = tmp_path / "bg.npy"
    np.save(path, np.array([["a", "b"], ["c", "d"]]))
    with pytest.raises(BackgroundError, match="numeric"):
        background.load(path)


def test_save_refuses_bad_image(tmp_path: Path) -> None:
    with pytest.raises(BackgroundError):
        background.save(tmp_path / "bg.h5", np.zeros(4))
    assert not (tmp_path / "bg.h5").exists()
