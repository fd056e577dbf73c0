"""Small helpers the benchmark scripts share: a wall/CPU clock, a timestamped log line, the machine record and an
atomic JSON write (so an interrupted run keeps the last complete file)."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from models.atomic import write_text_atomic  # the scripts put the repository on sys.path before importing this


class Clock:
    """Wall seconds and this process's CPU seconds (all threads). On a shared machine the CPU seconds divided by
    the thread count estimate the wall time the same work takes on an idle one."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cpu_flags() -> dict:
    """The CPU model and the SIMD flags that decide which kernels run (from /proc/cpuinfo; empty elsewhere)."""
    model, flags = "", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = value.split()
    except OSError:
        pass
    simd = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c", "sse4")))
    return {"cpu_model": model or platform.processor(), "cpu_flags": simd}


def machine() -> dict:
    return {
        **cpu_flags(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "loadavg_start": os.getloadavg(),
    }


def write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(result, indent=2))
