"""Decode and prefill speed of models.generate on SmolLM2-135M: against transformers' generate in the same dtype,
int4 against this project's bf16, against llama.cpp on the same GGUF, and against the machine's memory bandwidth,
all measured in one process. JSON out.

    python benchmarks/generate.py --out generate_bench.json
    python benchmarks/generate.py --llamacpp ~/.cache/llamacpp/bin --repeats 2 --out b.json   # with llama-bench
    python benchmarks/generate.py checkpointer.path=/path/SmolLM2-135M-Instruct.Q4_1.gguf --out b.json

Positional arguments are Hydra overrides on top of `task=generate` (default model: smollm2_135m from its pinned
source). Setting: batch 1, a `--prompt-tokens` prompt of random ids (fixed seed), `--new-tokens` greedy tokens with
no stop token, so every run decodes the same number of steps; `--threads` torch threads.

Runs, each `--repeats` times in rotation (so drift on a shared machine hits every run alike), best kept:
- memory bandwidth: a copy of a 1 GiB fp32 tensor (bytes read + bytes written per second), and a sum over it;
- fp32 and bf16: `transformers.LlamaForCausalLM.generate` (eager, dynamic cache) on an HF copy of the same weights
  (skip with --no-reference); `models.generate.generate` eager, and with compile=True (compile time reported apart);
- int4_wo at each `--groupsizes` with each `--heads` value of quantizer.quantize_head (none, int8, int4), bf16
  activations (the CPU int4 kernel's dtype), eager and compiled;
- prefill: one `--prefill-tokens` prompt (default 512) through each of our bf16/int4 models (prefill runs eager);
- `--llamacpp DIR`: llama.cpp's llama-bench on the model's GGUF file (for the default model its own Q4_1 file, with
  its Q8_0 tied embedding) with the same threads: prefill of the same length, and decode of `--new-tokens` after
  `--prompt-tokens` already in the cache (`-d`), as ours;
- at the end, a per-op profile (torch.profiler, self CPU ms per decode step, top ops) of the last int4 variant,
  eager and compiled.
Decode tokens/s = (new_tokens - 1) / (t(new_tokens) - t(1)) for both sides (transformers' generate does not report
decode apart from prefill), in wall-clock and in this process's CPU time.

Written: the JSON given by --out (rewritten after each round) and printed at the end: settings, machine (CPU model
and SIMD flags, threads, load average before and after), bandwidth, per-run decode tokens/s, weight bytes read per
token and the fraction of the bandwidth limit (bandwidth / bytes per token) reached, prefill tokens/s, llama.cpp's
figures, ratios and targets (issue 14: int4 decode >= 1.5x our bf16, >= llama.cpp's, >= 30% of its bandwidth
limit, prefill no slower than bf16; each judged on our faster mode, eager or compiled).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import machine, write_json  # noqa: E402 - benchmarks/ is on sys.path as the script dir

from models.checkpoint import save_hf  # noqa: E402 - after the path setup above
from models.generate import generate  # noqa: E402
from runner import common  # noqa: E402
from runner.generate import weight_bytes  # noqa: E402


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. checkpointer.path=FILE")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--groupsizes", type=int, nargs="*", default=[64])
    p.add_argument(
        "--heads", nargs="*", default=["none", "int8", "int4"], help="quantizer.quantize_head values of the int4 runs"
    )
    p.add_argument("--prefill-tokens", type=int, default=512, help="prompt length of the prefill measurement")
    p.add_argument(
        "--llamacpp",
        type=Path,
        default=None,
        help="folder with llama.cpp's llama-bench (bash ../shared/tools/build_llamacpp.sh builds it): also run it on "
        "the model's GGUF (checkpointer.path or the default model's Q4_1 file) with the same threads and lengths",
    )
    p.add_argument("--no-compile", action="store_true", help="skip the compiled runs (compilation takes minutes)")
    p.add_argument("--no-reference", action="store_true", help="skip transformers' runs")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args()


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _bandwidth(repeats: int) -> dict:
    src = torch.rand(256 * 1024**2)  # 1 GiB of fp32, far past any cache
    dst = torch.empty_like(src)
    nbytes = src.numel() * src.element_size()
    copy, read = [], []
    for _ in range(repeats + 1):  # the first pass faults the pages in
        t = time.perf_counter()
        dst.copy_(src)
        copy.append(2 * nbytes / (time.perf_counter() - t) / 1e9)
        t = time.perf_counter()
        src.sum()
        read.append(nbytes / (time.perf_counter() - t) / 1e9)
    return {"copy_gb_s": max(copy[1:]), "read_gb_s": max(read[1:]), "tensor_bytes": nbytes}


def _decode_rate(run, new: int) -> dict:
    """Decode tokens/s measured the same way for both sides: `run(n)` generates n tokens and returns its ids;
    (new - 1) tokens over the difference between n = new and n = 1, in wall-clock and in this process's CPU time.
    An untimed run(1) first takes the one-off costs (allocator growth, int4 layers packing their kernel layout)."""
    run(1)
    w1, c1 = time.perf_counter(), time.process_time()
    run(1)
    w1, c1 = time.perf_counter() - w1, time.process_time() - c1
    wn, cn = time.perf_counter(), time.process_time()
    ids, extra = run(new)
    wn, cn = time.perf_counter() - wn, time.process_time() - cn
    return {
        "decode_tokens_per_s": (new - 1) / (wn - w1),
        "decode_tokens_per_cpu_s": (new - 1) / (cn - c1),
        "total_s": wn,
        **extra,
        "ids": ids,
    }


def _greedy(model, tok, prompt: list[int], n: int, compile: bool = False) -> dict:
    """models.generate on one prompt, greedy, exactly n new tokens (no stop id or string: every run decodes the same
    steps); its one result dict."""
    [r] = generate(
        model,
        tok,
        [prompt],
        max_new_tokens=n,
        temperature=0.0,
        top_k=None,
        top_p=1.0,
        stop_ids=set(),
        stop_strings=[],
        generator=None,
        compile=compile,
    )
    return r


def _ours(model, tok, prompt: list[int], new: int, compile: bool) -> dict:
    def run(n: int):
        r = _greedy(model, tok, prompt, n, compile)
        tm = r["timings"]
        own = tm["decode_steps"] / tm["decode_s"] if tm["decode_steps"] else None
        return r["ids"], {"sampler_decode_tokens_per_s": own, "compile_s": tm["compile_s"]}

    # Compile untimed first (run(1) has no decode step, so it never compiles): the timed call then finds the graph
    # cached, as torch.compile reuses it across wrappers of the same model and shapes.
    compile_s = run(new)[1]["compile_s"] if compile else 0.0
    return _decode_rate(run, new) | {"compile_s": compile_s}


def _reference(model, prompt: list[int], new: int) -> dict:
    x = torch.tensor([prompt])
    model.generation_config.eos_token_id = None  # decode every step, as ours does (stop_ids=set())

    def run(n: int):
        gc = transformers.GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
        with torch.no_grad():
            out = model.generate(x, attention_mask=torch.ones_like(x), generation_config=gc)
        return out[0, len(prompt) :].tolist(), {}

    return _decode_rate(run, new)


def _prefill(model, tok, prompt: list[int]) -> dict:
    """Prefill tokens/s: generate one token after `prompt` (the time to the first token is the prefill)."""

    def once() -> float:
        return _greedy(model, tok, prompt, 1)["timings"]["time_to_first_token_s"]

    once()  # one-off costs: allocator growth, int4 kernel layouts
    return {"prefill_tokens_per_s": len(prompt) / min(once() for _ in range(2))}


def _profile(model, tok, prompt: list[int], compile: bool, steps: int = 16) -> list[dict]:
    """Per-op CPU time of `steps` decode steps (torch.profiler, after a warm-up run): the top ops by self time,
    in milliseconds per decode step (the prefill of the profiled run is taken out by profiling a 1-token run too)."""

    def run(n: int):
        _greedy(model, tok, prompt, n, compile)

    run(steps + 1)  # warm (and compile)
    tables = []
    for n in (1, steps + 1):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            run(n)
        tables.append({e.key: (e.self_cpu_time_total, e.count) for e in prof.key_averages()})
    one, many = tables
    rows = [
        {
            "op": k,
            "self_ms_per_step": (t - one.get(k, (0, 0))[0]) / 1e3 / steps,
            "calls_per_step": (c - one.get(k, (0, 0))[1]) / steps,
        }
        for k, (t, c) in many.items()
    ]
    rows.sort(key=lambda r: -r["self_ms_per_step"])
    total = sum(r["self_ms_per_step"] for r in rows)
    return [{"total_self_ms_per_step": total}] + [r for r in rows[:15] if r["self_ms_per_step"] > 0]


def _llama_bench(bench_dir: Path) -> Path:
    exe = bench_dir.expanduser() / "llama-bench"
    if not exe.is_file():
        raise SystemExit(
            f"error: --llamacpp {bench_dir}: no llama-bench there; bash ../shared/tools/build_llamacpp.sh "
            "builds it and prints its folder"
        )
    return exe


def _llamacpp(bench_dir: Path, gguf: Path, threads: int, depth: int, prefill: int, new: int, repeats: int) -> dict:
    """llama.cpp's own llama-bench on the GGUF file, same thread count: prefill tokens/s of a `prefill`-token prompt,
    and decode tokens/s of `new` tokens after `depth` tokens already in the cache (as ours: after the prompt)."""
    exe = _llama_bench(bench_dir)
    res = {}
    for kind, lengths in (
        ("prefill", ["-p", str(prefill), "-n", "0"]),
        ("decode", ["-p", "0", "-n", str(new), "-d", str(depth)]),
    ):
        cmd = [str(exe), "-m", str(gguf), "-t", str(threads), *lengths, "-r", str(repeats), "-o", "json"]
        [row] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        res[kind] = {"command": " ".join(cmd), "tokens_per_s": row["avg_ts"], "stddev": row["stddev_ts"]}
        res |= {"model_type": row["model_type"], "build_commit": row["build_commit"], "model_size": row["model_size"]}
    res["decode_tokens_per_s"], res["prefill_tokens_per_s"] = (
        res["decode"]["tokens_per_s"],
        res["prefill"]["tokens_per_s"],
    )
    return res


def _same_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _summary(runs: dict, bw: dict, bytes_per_token: dict) -> dict:
    best = {k: max(v, key=lambda r: r["decode_tokens_per_s"]) for k, v in runs.items() if v}
    out = {}
    for k, r in best.items():
        row = {key: val for key, val in r.items() if key != "ids"}
        row["repeats"] = [round(x["decode_tokens_per_s"], 2) for x in runs[k]]
        if "compile_s" in r:  # the first round compiles, later ones find the graphs cached
            row["compile_s"] = max(x["compile_s"] for x in runs[k])
        if k in bytes_per_token:
            limit = bw["copy_gb_s"] * 1e9 / bytes_per_token[k]
            row |= {"bytes_per_token": bytes_per_token[k], "bandwidth_limit_tokens_per_s": limit}
            row["fraction_of_bandwidth_limit"] = r["decode_tokens_per_s"] / limit
        out[k] = row
    return out


def _ratios(s: dict, int4: list[str], prefill: dict, llamacpp: dict | None) -> dict:
    def rate(name):
        return s[name]["decode_tokens_per_s"] if name in s else None

    def ours(kind):  # our faster mode of `kind`
        names = [n for n in (f"ours_{kind}_eager", f"ours_{kind}_compiled") if n in s]
        return max(names, key=rate) if names else None

    r, targets = {}, {}
    for dt in ("fp32", "bf16"):
        if ours(dt) and f"transformers_{dt}" in s:
            r[f"{dt}_vs_transformers"] = {"ours": ours(dt), "ratio": rate(ours(dt)) / rate(f"transformers_{dt}")}
    for k in int4:
        if not (ours(k) and ours("bf16")):
            continue
        r[f"{k}_vs_bf16"] = {"ours": ours(k), "ratio": rate(ours(k)) / rate(ours("bf16"))}
        r[f"{k}_fraction_of_bandwidth_limit"] = {"ours": ours(k), "ratio": s[ours(k)]["fraction_of_bandwidth_limit"]}
        targets[f"{k}_at_least_1.5x_bf16"] = r[f"{k}_vs_bf16"]["ratio"] >= 1.5
        targets[f"{k}_at_least_30pct_of_bandwidth_limit"] = r[f"{k}_fraction_of_bandwidth_limit"]["ratio"] >= 0.3
        if k in prefill and "bf16" in prefill:
            r[f"{k}_prefill_vs_bf16"] = prefill[k]["prefill_tokens_per_s"] / prefill["bf16"]["prefill_tokens_per_s"]
            targets[f"{k}_prefill_no_slower_than_bf16"] = r[f"{k}_prefill_vs_bf16"] >= 1.0
        if llamacpp:
            r[f"{k}_vs_llamacpp_decode"] = {"ours": ours(k), "ratio": rate(ours(k)) / llamacpp["decode_tokens_per_s"]}
            targets[f"{k}_decode_at_least_llamacpp"] = r[f"{k}_vs_llamacpp_decode"]["ratio"] >= 1.0
            if k in prefill:
                r[f"{k}_vs_llamacpp_prefill"] = prefill[k]["prefill_tokens_per_s"] / llamacpp["prefill_tokens_per_s"]
    if ours("bf16"):
        r["bf16_fraction_of_bandwidth_limit"] = {
            "ours": ours("bf16"),
            "ratio": s[ours("bf16")]["fraction_of_bandwidth_limit"],
        }
    return {"ratios": r, "targets_met": targets}


def _load_all(a):
    """(cfg, tokenizer, {variant: model}): fp32, bf16, and int4_wo at each groupsize with each quantize_head."""

    def load(*overrides: str):
        """The model as the stage loads it (common.load_model) for these overrides on top of the CLI's."""
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=["task=generate", *a.overrides, *overrides])
        return cfg, *common.load_model(cfg)

    cfg, fp32, tok = load("model.dtype=float32")
    ours = {"fp32": fp32, "bf16": load("model.dtype=bfloat16")[1]}
    for g in a.groupsizes:
        for head in a.heads:
            ov = ["model.dtype=bfloat16", "quantizer=int4_wo", f"quantizer.groupsize={g}"]
            name = f"int4_g{g}" + ("" if head == "none" else f"_head_{head}")
            ours[name] = load(*ov, f"quantizer.quantize_head={head}")[1]
    return cfg, tok, ours


def main() -> None:
    a = _args()
    if a.llamacpp is not None:
        _llama_bench(a.llamacpp)  # a wrong folder fails now, not after loading the models
    torch.set_num_threads(a.threads)
    result = {
        "settings": {
            "batch": 1,
            "prompt_tokens": a.prompt_tokens,
            "new_tokens": a.new_tokens,
            "prefill_tokens": a.prefill_tokens,
            "repeats": a.repeats,
            "overrides": a.overrides,
        },
        "machine": machine() | {"cpu_capability": torch.backends.cpu.get_cpu_capability()},
    }
    _log("loading the model: fp32, bf16, and int4_wo (without and with quantize_head) for each groupsize")
    cfg, tok, ours = _load_all(a)
    int4 = [k for k in ours if k.startswith("int4")]
    result["settings"]["model"] = cfg.model.name
    bytes_per_token = {
        f"ours_{k}_{mode}": weight_bytes(m)[1] for k, m in ours.items() for mode in ("eager", "compiled")
    }
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, ours["fp32"].args.vocab_size, (a.prompt_tokens,), generator=gen).tolist()
    long_prompt = torch.randint(0, ours["fp32"].args.vocab_size, (a.prefill_tokens,), generator=gen).tolist()
    refs = {}
    if not a.no_reference:
        with tempfile.TemporaryDirectory() as d:
            save_hf(d, ours["fp32"], tok)  # the same weights for the reference
            refs = {
                dt: transformers.LlamaForCausalLM.from_pretrained(d, dtype=torch_dt).eval()
                for dt, torch_dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))
            }
    llamacpp = None
    if a.llamacpp is not None:
        _log("llama.cpp: llama-bench on the model's GGUF")
        llamacpp = _llamacpp(
            a.llamacpp,
            common.checkpoint_path(cfg),
            a.threads,
            a.prompt_tokens,
            a.prefill_tokens,
            a.new_tokens,
            a.repeats,
        )
        result["llamacpp"] = llamacpp

    runs: dict[str, list] = {}
    prefill: dict[str, dict] = {}
    modes = ("eager",) if a.no_compile else ("eager", "compiled")
    for rnd in range(a.repeats):
        _log(f"round {rnd + 1}/{a.repeats}: memory bandwidth")
        runs.setdefault("bandwidth", []).append(_bandwidth(2))
        for dt, ref in refs.items():
            _log(f"round {rnd + 1}: transformers {dt}")
            runs.setdefault(f"transformers_{dt}", []).append(_reference(ref, prompt, a.new_tokens))
        for k, m in ours.items():
            for mode in modes:
                _log(f"round {rnd + 1}: ours {k} {mode}")
                runs.setdefault(f"ours_{k}_{mode}", []).append(_ours(m, tok, prompt, a.new_tokens, mode == "compiled"))
            if k != "fp32":
                _log(f"round {rnd + 1}: ours {k} prefill of {a.prefill_tokens} tokens")
                p = _prefill(m, tok, long_prompt)
                if k not in prefill or p["prefill_tokens_per_s"] > prefill[k]["prefill_tokens_per_s"]:
                    prefill[k] = p
        bw = {k: max(r[k] for r in runs["bandwidth"]) for k in ("copy_gb_s", "read_gb_s")}
        summary = _summary({k: v for k, v in runs.items() if k != "bandwidth"}, bw, bytes_per_token)
        result |= {"memory_bandwidth": bw, "runs": summary, "prefill": prefill}
        result |= _ratios(summary, int4, prefill, llamacpp)
        if refs:
            result["greedy_tokens_agree_with_transformers_fp32"] = _same_prefix(
                runs["ours_fp32_eager"][0]["ids"], runs["transformers_fp32"][0]["ids"]
            )
        result["machine"]["loadavg_end"] = os.getloadavg()
        write_json(a.out, result)
    _log("profile: the per-op CPU time of int4 decode steps, eager and compiled")
    profiled = int4[-1]
    result["profile"] = {
        f"{profiled}_{mode}": _profile(ours[profiled], tok, prompt, mode == "compiled") for mode in modes
    }
    write_json(a.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
