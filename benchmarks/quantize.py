"""Quantization quality and speed on one model: float vs RTN int4 vs GPTQ int4 over group sizes, JSON out.

    python benchmarks/quantize.py --out quantize_bench.json                    # the full grid (hours on 2 CPU cores)
    python benchmarks/quantize.py --nsamples 32 --groupsizes 64 128 --ppl-windows 20 --out small.json
    python benchmarks/quantize.py checkpointer=gguf checkpointer.path=/path/SmolLM2-135M-Instruct.Q4_1.gguf

Positional arguments are Hydra overrides on top of `task=quantize quantizer=gptq` (default model: smollm2_135m from
its pinned source). For every group size it scores RTN (`int4_wo`) and GPTQ with act-order off and on, all on the
same calibration windows (`--nsamples` x `--seqlen` tokens of `--calibration`, `--seed`), with WikiText-2 test
perplexity under the GPTQ paper's protocol (runner.perplexity, 2048-token windows; `--ppl-windows` limits the
count, default all). It also times two plain forward passes of the float model over the calibration windows: the
floor for sequential GPTQ, which must push the whole calibration set through every block once before quantizing it
and once after.

With `--reference`, the first group size (act-order on) is also quantized by the plain column-by-column Algorithm 1
of quant/gptq_reference.py (fp64) in place of ours, through the same sequential recipe, and the perplexities
compared (`reference`; target: ours within 1% of the reference's).

Targets checked in the output (`targets`): GPTQ (the better act-order setting) beats RTN at every group size, and each
GPTQ run takes at most 1.5x the two-pass floor.

Written: the JSON file given by --out, rewritten after every run and printed at the end: settings, machine (CPU
count, torch threads, load average), float perplexity, the floor, one record per run (method, groupsize, act_order,
ppl, wall `seconds`, process `cpu_seconds`) and the target checks. On a shared machine compare `cpu_seconds`:
this process's CPU time over all threads, which the other tenants do not inflate the way they inflate wall time.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import Clock, log, machine, write_json  # noqa: E402 - benchmarks/ is on sys.path as the script dir

from quant import describe, gptq, quantize_model  # noqa: E402
from quant.gptq_reference import reference_gptq  # noqa: E402
from quant.int4 import dequantize  # noqa: E402
from runner import common  # noqa: E402
from runner.calibration import calibration_windows  # noqa: E402
from runner.perplexity import perplexity, wikitext2_test_text  # noqa: E402


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. checkpointer.path=FILE model.dtype=float32")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--calibration", default="c4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--groupsizes", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--act-order", choices=["both", "on", "off"], default="both")
    p.add_argument(
        "--both-at",
        type=int,
        nargs="*",
        default=None,
        help="with --act-order on: group sizes at which act-order off runs as well (a cheaper grid)",
    )
    p.add_argument("--ppl-windows", type=int, default=None, help="first N WikiText-2 windows (default: all)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's); 1 on an oversubscribed machine"
    )
    p.add_argument("--skip-floor", action="store_true", help="do not time the two-pass floor (quality runs only)")
    p.add_argument(
        "--reference",
        action="store_true",
        help="also run the whole model through the plain column-by-column Algorithm 1 (quant/gptq_reference.py) "
        "at the first group size, act-order on, and compare its perplexity with ours",
    )
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args()


def _config(a: argparse.Namespace):
    overrides = [
        "task=quantize",
        "quantizer=gptq",
        f"quantizer.nsamples={a.nsamples}",
        f"quantizer.seqlen={a.seqlen}",
        f"quantizer.calibration={a.calibration}",
        f"quantizer.seed={a.seed}",
        f"task.ppl_windows={'null' if a.ppl_windows is None else a.ppl_windows}",
        *a.overrides,
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def _ppl(cfg, model, tok, text) -> tuple[float, int]:
    t = cfg.task
    return perplexity(model, tok, text, t.ppl_seqlen, t.ppl_windows, t.ppl_batch_size)


@torch.no_grad()
def _forward(model, calib: torch.Tensor, passes: int) -> None:
    dev = next(model.parameters()).device
    for _ in range(passes):
        for row in calib:
            model(row[None].to(dev))


def _reference_weight(
    W, H, *, groupsize, blocksize, percdamp, act_order, static_groups, sym, scale_search
) -> gptq.GPTQResult:
    """quant.gptq.gptq_quantize_weight's contract, computed by the column-by-column reference (fp64, no lazy
    batches; blocksize does not apply; min-max grids only)."""
    if scale_search:
        sys.exit("--reference compares the paper's min-max grids: add quantizer.scale_search=false")
    g, K = groupsize, W.shape[1]
    q, s, z, order = reference_gptq(W, H, g, percdamp, act_order, static_groups, sym)
    if act_order and not static_groups:  # groups are runs of g columns in quantization order
        g_idx = (torch.argsort(order) // g).to(torch.int32)
        first = order[::g]
    else:
        g_idx, first = None, torch.arange(0, q.shape[1], g)
    scales, zeros = s[:, first].float(), z[:, first].float()
    W0, H0 = W.double(), H.double()
    E = W0 - dequantize(q, scales.double(), zeros.double(), g, g_idx)[:, :K]
    sqnr = (10 * torch.log10(((W0 @ H0) * W0).sum() / ((E @ H0) * E).sum())).item()
    return gptq.GPTQResult(
        q=q.to(torch.uint8), scales=scales, zeros=zeros, g_idx=g_idx, loss=float("nan"), sqnr_db=sqnr
    )


def _targets(result: dict, groupsizes: list[int]) -> dict:
    floor_wall, floor_cpu = result["floor_two_forward_s"], result["floor_two_forward_cpu_s"]
    targets = {}
    for g in groupsizes:
        rtn = [r["ppl"] for r in result["runs"] if r["method"] == "rtn" and r["groupsize"] == g]
        gptq = [r for r in result["runs"] if r["method"] == "gptq" and r["groupsize"] == g]
        if not rtn or not gptq:
            continue
        best = min(gptq, key=lambda r: r["ppl"])
        targets[f"g{g}"] = {
            "gptq_beats_rtn": best["ppl"] < rtn[0],
            "best_act_order": best["act_order"],
            **{f"gptq_beats_rtn_act_order_{r['act_order']}": r["ppl"] < rtn[0] for r in gptq},
        }
        if floor_wall is not None:
            targets[f"g{g}"] |= {
                "max_time_over_floor": max(r["seconds"] for r in gptq) / floor_wall,
                "max_cpu_time_over_floor": max(r["cpu_seconds"] for r in gptq) / floor_cpu,
                "time_within_1.5x_floor": all(r["seconds"] <= 1.5 * floor_wall for r in gptq),
            }
    return targets


def _write(path: Path, result: dict, groupsizes: list[int]) -> None:
    result["targets"] = _targets(result, groupsizes)
    write_json(path, result)


def _settings(a: argparse.Namespace, cfg) -> dict:
    return {
        "model": cfg.model.name,
        "checkpoint": str(common.checkpoint_path(cfg)),
        "dtype": cfg.model.dtype,
        "device": str(common.device(cfg)),
        "nsamples": a.nsamples,
        "seqlen": a.seqlen,
        "calibration": a.calibration,
        "seed": a.seed,
        "ppl_seqlen": cfg.task.ppl_seqlen,
        "ppl_windows": a.ppl_windows,
        "gptq": {
            k: v
            for k, v in OmegaConf.to_container(cfg.quantizer, resolve=True).items()
            if k not in ("groupsize", "act_order")
        },
        "overrides": a.overrides,
    }


def _time_floor(a: argparse.Namespace, float_model, calib: torch.Tensor, result: dict) -> None:
    """The two-pass floor (wall and CPU seconds; None with --skip-floor) into `result`."""
    result["floor_two_forward_s"] = result["floor_two_forward_cpu_s"] = None
    if not a.skip_floor:
        with Clock() as floor:
            _forward(float_model, calib, passes=2)
        result["floor_two_forward_s"], result["floor_two_forward_cpu_s"] = floor.wall, floor.cpu


def _groupsize_runs(
    a: argparse.Namespace, cfg, g: int, act_orders: list[bool], base: dict, float_model, tok, text, calib, result
) -> None:
    """RTN and GPTQ (each act-order setting) at group size `g`, each from the float model, into result["runs"]."""
    plans = [("rtn", {"name": "int4_wo", "groupsize": g, "sym": base["sym"]}, None)]
    plans += [("gptq", {**base, "groupsize": g, "act_order": ao}, ao) for ao in act_orders]
    for method, qcfg, act_order in plans:
        model = copy.deepcopy(float_model)
        with Clock() as clock:
            quantize_model(model, qcfg, calib if method == "gptq" else None)
        ppl, _ = _ppl(cfg, model, tok, text)
        run = {
            "method": method,
            "groupsize": g,
            "act_order": act_order,
            "ppl": ppl,
            "seconds": clock.wall,
            "cpu_seconds": clock.cpu,
        }
        result["runs"].append(run)
        log(json.dumps(run))
        _write(a.out, result, a.groupsizes)  # after every run, so an interrupted grid keeps what it measured
        del model


def _reference_check(a: argparse.Namespace, cfg, base: dict, float_model, tok, text, calib, result: dict) -> None:
    """--reference: ours against the column-by-column Algorithm 1 at the first group size, act-order on."""
    # The same configuration twice, each from the float model on the same calibration windows: ours as shipped
    # (float64 solve on CPU) and the column-by-column reference (float64). They give identical integers layer
    # by layer (tests/quant/test_gptq.py); here the whole sequential recipe is compared by perplexity.
    g = a.groupsizes[0]
    spec = describe({**base, "groupsize": g, "act_order": True})

    def reference(Ws, H, **kw):
        return [_reference_weight(W, H, **kw) for W in Ws]

    ref = {"groupsize": g, "act_order": True, "solve_dtype": str(gptq.CPU_SOLVE_DTYPE)}
    shipped = [r for r in result["runs"] if r["method"] == "gptq" and r["groupsize"] == g and r["act_order"]]
    labels = [("reference", reference)]
    if shipped:  # the grid already ran ours as shipped at this setting
        ref["ppl_ours"], ref["seconds_ours"] = shipped[0]["ppl"], shipped[0]["seconds"]
    else:
        labels.insert(0, ("ours", gptq.gptq_quantize_weights))
    for label, fn in labels:
        log(f"reference check: {label}, groupsize {g}, act-order on")
        model = copy.deepcopy(float_model)
        with Clock() as clock:
            gptq.gptq_quantize_model(model, calib, spec, solve=fn)
        ref[f"ppl_{label}"], _ = _ppl(cfg, model, tok, text)
        ref[f"seconds_{label}"] = clock.wall
        del model
    rel = abs(ref["ppl_ours"] - ref["ppl_reference"]) / ref["ppl_reference"]
    ref["relative_difference"], ref["within_1_percent"] = rel, rel <= 0.01
    result["reference"] = ref
    log(json.dumps(ref))
    _write(a.out, result, a.groupsizes)


def main() -> None:
    a = _args()
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    cfg = _config(a)
    started = time.time()
    float_model, tok = common.load_model(cfg, apply_quantizer=False)
    text = wikitext2_test_text(cfg)
    calib = calibration_windows(cfg, tok)  # [nsamples, seqlen]
    result = {"settings": _settings(a, cfg), "machine": machine(), "runs": []}
    log(f"calibration {tuple(calib.shape)}; timing two forward passes of the float model")
    _time_floor(a, float_model, calib, result)
    ppl, n = _ppl(cfg, float_model, tok, text)
    result["ppl_float"], result["ppl_windows_scored"] = ppl, n
    log(f"float ppl {ppl:.4f} over {n} windows; floor {result['floor_two_forward_s']} s wall")

    act_orders = {"both": [False, True], "on": [True], "off": [False]}[a.act_order]
    both_at = set(a.both_at or [])
    base = OmegaConf.to_container(cfg.quantizer, resolve=True)
    for g in a.groupsizes:
        orders = [False, True] if g in both_at else act_orders
        _groupsize_runs(a, cfg, g, orders, base, float_model, tok, text, calib, result)

    if a.reference:
        _reference_check(a, cfg, base, float_model, tok, text, calib, result)

    result["machine"]["loadavg_end"] = os.getloadavg()
    result["total_s"] = time.time() - started
    _write(a.out, result, a.groupsizes)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
