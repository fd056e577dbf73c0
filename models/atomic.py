"""Atomic writes: build a file or directory under a temporary sibling name, then move it into place with one
`os.replace`, so a crash or a concurrent reader never sees it half-written (checkpoints, caches, status files).

The lowest layer that writes files (models/), so models/, runner/ and benchmarks/ all use this one copy.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path, directory: bool = False, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write into (an empty directory when `directory`), named
    `<name>.<pid>-<random>.tmp` so that two writers of one path (the jobs of a sweep filling one cache entry) never
    share it; `suffix` replaces that ending. Leftovers of crashed earlier writes (their process gone) are removed
    first. When the block ends without an error the temporary replaces `path` (an existing directory there is
    removed first); on an error it is removed and `path` is left as it was."""
    path = Path(path)
    for leftover in _leftovers(path):
        _remove(leftover)
    tmp = path.with_name(path.name + (suffix if suffix is not None else f".{os.getpid()}-{secrets.token_hex(4)}.tmp"))
    _remove(tmp)
    if directory:
        tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)  # a concurrent writer may have removed it already
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def _leftovers(path: Path) -> list[Path]:
    """Temporaries of `path` whose writer no longer runs (and the single `<name>.tmp` of older versions)."""
    found = [path.with_name(path.name + ".tmp")]
    for p in path.parent.glob(f"{glob.escape(path.name)}.*-*.tmp"):
        pid = p.name[len(path.name) + 1 :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            found.append(p)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` (utf-8) atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)
