"""Atomic writes: build a file or directory under a temporary sibling name, then move it into place with one
`os.replace`, so a crash or a concurrent reader never sees it half-written (checkpoints, caches, status files).

The lowest layer that writes files (models/), so models/, runner/ and benchmarks/ all use this one copy.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path, directory: bool = False, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield `<path><suffix>` to write into (an empty directory when `directory`; any leftover from an earlier
    crash is removed first). When the block ends without an error it replaces `path` (an existing directory there is
    removed first); on an error it is removed and `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(path.name + suffix)
    _remove(tmp)
    if directory:
        tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` (utf-8) atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)
