"""Our Q4_0 GGUF export against llama.cpp's own Q4_0, all scored by llama.cpp's llama-perplexity, JSON out.

    bash ../shared/tools/build_llamacpp.sh        # once per machine: builds llama.cpp's tools from the PyPI sdist
    python benchmarks/llamacpp_export.py --llamacpp ~/.cache/llamacpp/bin --out llamacpp_export.json
    python benchmarks/llamacpp_export.py --llamacpp ~/.cache/llamacpp/bin --ctx 256 --chunks 2 --threads 1 \
        --out /tmp/short.json quantizer.nsamples=2 quantizer.seqlen=128          # a quick check that it runs

One float model (the default model, dequantized from its GGUF), one text (WikiText-2 test from the data root,
read by llama-perplexity as raw bytes), one context (`--ctx`, `--chunks`), three files of the same tensor types
(decoder linears Q4_0, token embedding F16, norms F32):
- `ours_gptq_q4_0`: `python -m runner task=quantize quantizer=gptq quantizer.sym=true quantizer.groupsize=32
  quantizer.static_groups=true task.export=[gguf]`: the sink-aware GPTQ as shipped (default calibration), on
  llama.cpp's Q4_0 grid, written exactly as Q4_0 blocks. static_groups is needed: act-order groups (g_idx) have no
  block form (task=export refuses them).
- `llamacpp_q4_0`: `llama-quantize --pure --token-embedding-type f16 F16 Q4_0` of our F16 export of the same float model
  (`task=export task.format=gguf`).
- `llamacpp_q4_0_imatrix`: the same with `--imatrix` from `llama-imatrix` on the F16 export, over the text of our
  GPTQ's calibration windows (quantizer.calibration, nsamples x seqlen, seed: runner/calibration.py; each window
  one chunk of seqlen tokens), so both methods see the same calibration text.
- `f16`: the F16 export itself, for reference.
The three Q4_0 files must hold the same tensor bytes (checked; the run fails otherwise). Positional arguments are
Hydra overrides for the GPTQ run and the calibration (e.g. quantizer.nsamples=128 seed=1). Written: the JSON given by
--out (machine with CPU flags, settings, per file: llama.cpp's perplexity and its +/-, file and tensor bytes, seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from gguf import GGUFReader
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import Clock, log, machine, write_json  # noqa: E402 - benchmarks/ is on sys.path as the script dir

from models.gguf import load_gguf  # noqa: E402 - after the path setup above
from runner import common  # noqa: E402
from runner.calibration import calibration_windows  # noqa: E402
from runner.perplexity import WIKITEXT2_TEST  # noqa: E402

GPTQ = ["quantizer=gptq", "quantizer.sym=true", "quantizer.groupsize=32", "quantizer.static_groups=true"]
TOOLS = ("llama-perplexity", "llama-imatrix", "llama-quantize")


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides for the GPTQ run, e.g. quantizer.nsamples=128")
    p.add_argument("--llamacpp", type=Path, required=True, help="folder with " + ", ".join(TOOLS))
    p.add_argument("--ctx", type=int, default=2048, help="llama-perplexity context (-c); the GPTQ paper's 2048")
    p.add_argument("--chunks", type=int, default=None, help="first N chunks of the text (default: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=None, help="keep the files here (default: a temporary folder)")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args()


def _run(cmd: list[str], env: dict | None = None) -> str:
    log(" ".join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"{Path(cmd[0]).name} {' '.join(cmd[1:4])} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr


def _runner(args: list[str], threads: int) -> None:
    """python -m runner ARGS, as a user runs it (public knobs only)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    _run([sys.executable, "-m", "runner", *args], env=env)


def _one_gguf(folder: Path) -> Path:
    files = sorted(folder.glob("*.gguf"))
    if len(files) != 1:
        sys.exit(f"{folder}: expected one .gguf file, found {[f.name for f in files]}")
    return files[0]


def _tensor_bytes(path: Path) -> int:
    return sum(int(t.n_bytes) for t in GGUFReader(path).tensors)


def _types(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in GGUFReader(path).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def _perplexity(a: argparse.Namespace, model: Path, text: Path) -> dict:
    cmd = [str(a.llamacpp / "llama-perplexity"), "-m", str(model), "-f", str(text), "-c", str(a.ctx)]
    cmd += ["-t", str(a.threads)] + (["--chunks", str(a.chunks)] if a.chunks else [])
    with Clock() as c:
        out = _run(cmd)
    found = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", out)
    if found is None:
        sys.exit(f"llama-perplexity printed no final estimate for {model}:\n{out[-2000:]}")
    return {"ppl": float(found.group(1)), "ppl_pm": float(found.group(2)), "seconds": c.wall}


def main() -> None:
    a = _args()
    missing = [t for t in TOOLS if not (a.llamacpp / t).is_file()]
    if missing:
        sys.exit(
            f"--llamacpp {a.llamacpp}: no {', '.join(missing)} there; build them: bash ../shared/tools/build_llamacpp.sh"
        )
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["task=quantize", *GPTQ, *a.overrides])
    text = common.data_path(cfg, WIKITEXT2_TEST)
    work = a.work or Path(tempfile.mkdtemp(prefix="llamacpp_export_"))
    result = {
        "machine": machine(),
        "settings": {
            "ctx": a.ctx,
            "chunks": a.chunks,
            "threads": a.threads,
            "text": str(text),
            "overrides": a.overrides,
            "gptq": GPTQ,
            "calibration": {k: cfg.quantizer[k] for k in ("calibration", "nsamples", "seqlen", "seed")},
            "work": str(work),
        },
        "models": {},
    }
    data = [f"paths.data_dir={cfg.paths.data_dir}"]

    with Clock() as c:
        _runner(
            ["task=export", "task.format=gguf", "task.check=false", *data, f"hydra.run.dir={work / 'f16'}"], a.threads
        )
    f16 = _one_gguf(work / "f16" / "export")
    result["settings"]["f16_export_seconds"] = c.wall
    with Clock() as c:
        run = [f"hydra.run.dir={work / 'gptq'}", "task.ppl=false", "task.export=[gguf]"]
        _runner(["task=quantize", *GPTQ, *a.overrides, *data, *run], a.threads)
    ours = _one_gguf(work / "gptq" / "export" / "gguf")
    result["settings"]["gptq_seconds"] = c.wall

    _, _, tok = load_gguf(f16)
    calib = calibration_windows(cfg, tok)  # [nsamples, seqlen], the windows our GPTQ ran on
    calib_text = work / "calibration.txt"
    calib_text.write_text("".join(tok.decode(row.tolist()) for row in calib), encoding="utf-8")
    imatrix = work / "imatrix.dat"
    with Clock() as c:
        _run(
            [str(a.llamacpp / "llama-imatrix"), "-m", str(f16), "-f", str(calib_text), "-o", str(imatrix),
             "-c", str(calib.shape[1]), "--chunks", str(calib.shape[0]), "-t", str(a.threads)]
        )  # fmt: skip
    result["settings"]["imatrix_seconds"] = c.wall

    files = {"ours_gptq_q4_0": ours}
    for name, extra in (("llamacpp_q4_0", []), ("llamacpp_q4_0_imatrix", ["--imatrix", str(imatrix)])):
        files[name] = work / f"{name}.gguf"
        # --pure: every decoder linear Q4_0 (with an imatrix llama-quantize otherwise moves some ffn_down to Q4_1)
        quantize = [str(a.llamacpp / "llama-quantize"), "--pure", "--token-embedding-type", "f16", *extra]
        _run([*quantize, str(f16), str(files[name]), "Q4_0", str(a.threads)])
    files["f16"] = f16

    sizes = {name: _tensor_bytes(path) for name, path in files.items()}
    q4 = {sizes[n] for n in files if n != "f16"}
    if len(q4) != 1:
        sys.exit(f"the Q4_0 files hold different tensor bytes ({sizes}); types: {[_types(p) for p in files.values()]}")
    for name, path in files.items():
        result["models"][name] = {
            **_perplexity(a, path, text),
            "file_bytes": path.stat().st_size,
            "tensor_bytes": sizes[name],
            "tensor_types": _types(path),
            "path": str(path),
        }
        log(f"{name}: llama.cpp ppl {result['models'][name]['ppl']:.4f}")
        write_json(a.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
