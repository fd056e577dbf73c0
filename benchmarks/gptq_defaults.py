"""Which GPTQ settings to ship: RTN and GPTQ variants scored on WikiText-2 (paper protocol) in one process, JSON out.

    python benchmarks/gptq_defaults.py --windows 16 --out gptq_defaults.json \
        --plan rtn_g128 quantizer=int4_wo quantizer.groupsize=128 \
        --plan gptq_default \
        --plan gptq_fp32 solve=float32 \
        --plan gptq_pd0.1 quantizer.percdamp=0.1

Each `--plan NAME [override ...]` is one run from the float model: Hydra overrides on top of `task=quantize
quantizer=gptq` (so a plan with no overrides is the main job's quantizer), plus `solve=float32|float64` for the
dtype of GPTQ's per-layer solve on CPU (`cpu_solve_dtype` of quant.gptq.gptq_quantize_model). The float model's
perplexity is scored once.
Written: the JSON given by --out, rewritten after every run: windows scored, float ppl (unless --skip-float), per run its quantizer config,
seconds and ppl.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import machine, write_json  # noqa: E402 - benchmarks/ is on sys.path as the script dir

from quant import describe, gptq, quantize_model, quantizer  # noqa: E402 - after the path setup above
from runner import common  # noqa: E402
from runner.calibration import calibration_windows  # noqa: E402
from runner.perplexity import perplexity, wikitext2_test_text  # noqa: E402


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", nargs="+", action="append", required=True, metavar="NAME [OVERRIDE ...]")
    p.add_argument("--windows", type=int, default=16, help="first N WikiText-2 windows of 2048 tokens (0: all)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-float", action="store_true", help="do not score the float model (saves one scoring pass)")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args()


def _config(windows: int, overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(
            "config",
            overrides=["task=quantize", "quantizer=gptq", f"task.ppl_windows={windows or 'null'}", *overrides],
        )


def main() -> None:
    a = _args()
    if a.threads:
        torch.set_num_threads(a.threads)
    base = _config(a.windows, [])
    model, tok = common.load_model(base, apply_quantizer=False)
    text = wikitext2_test_text(base)

    scored = {}

    def ppl(m) -> float:
        t = base.task
        value, scored["windows"] = perplexity(m, tok, text, t.ppl_seqlen, t.ppl_windows, t.ppl_batch_size)
        return value

    result = {
        "windows": a.windows,
        "machine": machine(),
        "ppl_float": None if a.skip_float else ppl(model),
        "runs": [],
    }
    for name, *over in a.plan:
        solve = [o.split("=", 1)[1] for o in over if o.startswith("solve=")]
        cfg = _config(a.windows, [o for o in over if not o.startswith("solve=")])
        q = OmegaConf.to_container(cfg.quantizer, resolve=True)
        calib = calibration_windows(cfg, tok) if quantizer(q).needs_calibration else None
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        if solve:  # a GPTQ experiment knob that quantizer.json does not record: call GPTQ directly
            gptq.gptq_quantize_model(m, calib, describe(q), cpu_solve_dtype=getattr(torch, solve[0]))
        else:
            quantize_model(m, q, calib)
        seconds = time.perf_counter() - t0
        run = {"name": name, "overrides": over, "quantizer": q, "seconds": seconds, "ppl": ppl(m)}
        result["windows"] = scored["windows"]
        result["runs"].append(run)
        print(json.dumps({k: run[k] for k in ("name", "seconds", "ppl")}), file=sys.stderr, flush=True)
        write_json(a.out, result)
        del m
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
