"""BACKGROUND_FILE confinement (background.confine): `..` and symlinks out of the allowed
directories are refused with the reason; paths that stay inside are accepted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from psss_ioc.core import background
from psss_ioc.ioc.config import IocConfig


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    outside = tmp_path / "outside.npy"
    np.save(outside, np.ones((3, 4), dtype=np.uint16))
    np.save(allowed / "bg.npy", np.ones((3, 4), dtype=np.uint16))
    (allowed / "out-link.npy").symlink_to(outside)
    (allowed / "sub" / "in-link.npy").symlink_to(allowed / "bg.npy")
    (allowed / "dir-link").symlink_to(tmp_path)
    return allowed, outside


@pytest.mark.parametrize(("name", "reason"), [
    ("../outside.npy", "'..' leads out"),
    ("sub/../../outside.npy", "'..' leads out"),
    ("out-link.npy", "symlink leads out"),
    ("dir-link/outside.npy", "symlink leads out"),
])
def test_tricks_out_of_the_directory_are_refused(tree: tuple[Path, Path], name: str,
                                                 reason: str) -> None:
    allowed, _ = tree
    with pytest.raises(background.BackgroundError, match="not allowed") as e:
        background.load(f"{allowed}/{name}", allowed=[allowed])
    assert reason in str(e.value) and str(allowed) in str(e.value)


def test_outside_paths_and_nul_are_refused(tree: tuple[Path, Path]) -> None:
    allowed, outside = tree
    for path in (str(outside), "/etc/passwd", "relative.npy"):
        with pytest.raises(background.BackgroundError, match="outside them"):
            background.load(path, allowed=[allowed])
    with pytest.raises(background.BackgroundError, match="NUL"):
        background.confine(f"{allowed}/bg\x00.npy", [allowed])
    with pytest.raises(background.BackgroundError, match="none configured"):
        background.confine(str(outside), [])


def test_paths_that_stay_inside_are_accepted(tree: tuple[Path, Path]) -> None:
    allowed, outside = tree
    for name in ("bg.npy", "sub/../bg.npy", "sub/in-link.npy"):
        assert background.load(f"{allowed}/{name}", allowed=[allowed]).shape == (3, 4)
    assert background.load(outside).shape == (3, 4)  # no `allowed`: not confined
    assert background.confine(outside, [allowed, outside.parent]) == outside.resolve()


def test_the_default_allow_list_is_the_background_directory(tmp_path: Path) -> None:
    config = IocConfig(autosave_dir=tmp_path / "as")
    assert config.allowed_background_dirs() == ((tmp_path / "as" / "backgrounds").resolve(),)
    config = IocConfig(background_dir=tmp_path / "bg", background_paths=(tmp_path / "x",
                                                                           tmp_path / "bg"))
    assert config.allowed_background_dirs() == ((tmp_path / "bg").resolve(),
                                                (tmp_path / "x").resolve())
