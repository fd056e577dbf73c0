"""lmrunner's 4-bit against llama.cpp's at the same storage (symmetric blocks of 32 = llama.cpp's Q4_0), JSON out.

    bash ../shared/tools/build_llamacpp.sh                     # once per machine: prints the tools' folder
    python benchmarks/llamacpp_q4.py --llamacpp ~/.cache/llamacpp/bin --windows 16 --out llamacpp_q4.json

One run, one float model (the default model's GGUF, dequantized), one scorer (lmrunner's WikiText-2 perplexity,
paper protocol, first `--windows` 2048-token windows), these models:
- `float`: the model itself;
- `llamacpp_q4_0`: `llama-quantize --allow-requantize SRC Q4_0` of the default model's own GGUF (llama.cpp
  dequantizes it to the float model, then rounds each block of 32 on its Q4_0 grid);
- `llamacpp_q4_0_imatrix`: the same with `--imatrix` from `llama-imatrix` run on the text of lmrunner's own
  calibration windows (`quantizer=gptq`'s corpus, nsamples x seqlen, seed; each window a chunk of seqlen tokens);
- `rtn_sym_g32`: lmrunner's round-to-nearest on the same grid (`quantizer=int4_wo quantizer.sym=true
  quantizer.groupsize=32`);
- `gptq_sym_g32`: lmrunner's `quantizer=gptq` as shipped with `quantizer.sym=true quantizer.groupsize=32`.
Only the decoder linears are compared: the llama.cpp files keep the token embedding (the tied output head) in F16
(`--token-embedding-type f16 --output-tensor-type f16`) as lmrunner keeps it in float. The llama.cpp files are read
back by lmrunner's GGUF reader (`checkpointer=gguf`). Positional arguments are Hydra overrides on top of
`task=quantize quantizer=gptq`. Written: the JSON given by --out (machine, settings, per model ppl and seconds).
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import Clock, log, machine, write_json  # noqa: E402 - benchmarks/ is on sys.path as the script dir

from quant import quantize_model, quantizer  # noqa: E402 - after the path setup above
from runner import common  # noqa: E402
from runner.calibration import calibration_windows  # noqa: E402
from runner.perplexity import perplexity, wikitext2_test_text  # noqa: E402


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. seed=1")
    p.add_argument("--llamacpp", type=Path, required=True, help="folder with llama-quantize and llama-imatrix")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args()


def _config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=["task=quantize", "quantizer=gptq", *overrides])


def _run(cmd: list[str]) -> None:
    log(" ".join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{cmd[0]} failed ({done.returncode}):\n{done.stderr[-3000:]}")


def main() -> None:
    a = _args()
    torch.set_num_threads(a.threads)
    for tool in ("llama-quantize", "llama-imatrix"):
        if not (a.llamacpp / tool).is_file():
            sys.exit(f"--llamacpp {a.llamacpp}: no {tool} there; build it with bash ../shared/tools/build_llamacpp.sh")
    cfg = _config(a.overrides)
    src = common.checkpoint_path(cfg)
    if src is None or Path(src).suffix != ".gguf":
        sys.exit(f"the model's checkpoint must be a GGUF file for llama.cpp to read (got {src})")
    model, tok = common.load_model(cfg, apply_quantizer=False)
    text = wikitext2_test_text(cfg)
    result = {"machine": machine(), "settings": {"windows": a.windows, "source": str(src), "overrides": a.overrides}}
    result["models"] = {}

    def score(name: str, m, seconds: float | None = None, **extra) -> None:
        ppl, n = perplexity(m, tok, text, cfg.task.ppl_seqlen, a.windows, 1)
        result["models"][name] = {"ppl": ppl, "windows": n, "seconds": seconds, **extra}
        log(f"{name}: ppl {ppl:.4f}")
        write_json(a.out, result)

    score("float", model)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        calib = calibration_windows(cfg, tok)  # [nsamples, seqlen]
        (tmp / "calib.txt").write_text("".join(tok.decode(row.tolist()) for row in calib), encoding="utf-8")
        result["settings"]["calibration"] = {k: cfg.quantizer[k] for k in ("calibration", "nsamples", "seqlen", "seed")}
        threads = ["-t", str(a.threads)]
        with Clock() as c:
            _run(
                [str(a.llamacpp / "llama-imatrix"), "-m", str(src), "-f", str(tmp / "calib.txt"), "-o",
                 str(tmp / "imatrix.dat"), "-c", str(calib.shape[1]), "--chunks", str(calib.shape[0]), *threads]
            )  # fmt: skip
        result["settings"]["imatrix_seconds"] = c.wall
        embed = ["--token-embedding-type", "f16", "--output-tensor-type", "f16"]
        for name, extra in (("llamacpp_q4_0", []), ("llamacpp_q4_0_imatrix", ["--imatrix", str(tmp / "imatrix.dat")])):
            out = tmp / f"{name}.gguf"
            with Clock() as c:
                _run(
                    [
                        str(a.llamacpp / "llama-quantize"),
                        "--allow-requantize",
                        *embed,
                        *extra,
                        str(src),
                        str(out),
                        "Q4_0",
                    ]
                )
            qcfg = _config([*a.overrides, "checkpointer=gguf", f"checkpointer.path={out}"])
            m, _ = common.load_model(qcfg, apply_quantizer=False)
            score(name, m, c.wall, file_bytes=out.stat().st_size)
            del m

    for name, over in (
        ("rtn_sym_g32", ["quantizer=int4_wo", "quantizer.sym=true", "quantizer.groupsize=32"]),
        ("gptq_sym_g32", ["quantizer.sym=true", "quantizer.groupsize=32"]),
    ):
        qcfg = _config([*a.overrides, *over])
        q = OmegaConf.to_container(qcfg.quantizer, resolve=True)
        calib = calibration_windows(qcfg, tok) if quantizer(q).needs_calibration else None
        m = copy.deepcopy(model)
        with Clock() as c:
            quantize_model(m, q, calib)
        score(name, m, c.wall, quantizer=q)
        del m
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
