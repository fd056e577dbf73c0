"""models/atomic.py: a file or directory appears whole or not at all."""

from __future__ import annotations

import pytest

from models.atomic import atomic_path, write_text_atomic


def test_file_replaces_the_old_one_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "status.json"
    path.write_text("old")
    write_text_atomic(path, "new")
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]


def test_error_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "cache.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.json"]


def test_directory_replaces_an_existing_one_and_clears_a_leftover(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "stale.bin").write_text("x")
    dead = tmp_path / "model.999999999-0a1b2c3d.tmp"  # left by a crashed earlier write (no such pid)
    dead.mkdir()
    (dead / "half.bin").write_text("x")
    (tmp_path / "model.tmp").mkdir()  # the single temporary name of older versions
    with atomic_path(final, directory=True) as tmp:
        assert tmp.is_dir() and not any(tmp.iterdir())
        (tmp / "weights.bin").write_text("w")
    assert sorted(p.name for p in final.iterdir()) == ["weights.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_suffix_names_the_temporary(tmp_path):
    with atomic_path(tmp_path / "f.bin", suffix=".part7") as tmp:
        assert tmp.name == "f.bin.part7"
        tmp.write_text("x")
    assert (tmp_path / "f.bin").read_text() == "x"


def test_two_writers_of_one_path_get_their_own_temporaries(tmp_path):
    # Two jobs of a sweep filling one cache entry: both finish, neither removes the other's half-written file.
    path = tmp_path / "key.json"
    with atomic_path(path) as a:
        a.write_text("first")
        with atomic_path(path) as b:
            assert a != b and a.exists()
            b.write_text("second")
        assert a.read_text() == "first"
    assert path.read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key.json"]
