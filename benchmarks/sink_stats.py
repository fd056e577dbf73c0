"""Why GPTQ needs the attention sink weighted: per block, the residual-stream norm of position 0 against the other
tokens, and each linear's output error on position 0 and on the rest after GPTQ with and without the weighting.

    python benchmarks/sink_stats.py --windows 4 --sink-weight 256 --out sink_stats.json

Runs the float model over `--windows` calibration windows (`quantizer=gptq`'s corpus, seqlen and seed; Hydra
overrides as positional arguments). For every block: the residual norm at position 0 and the median over the other
positions (the block's input), the attention position 0 receives in that block (`quant.gptq.attention_received`,
a share of all attention, 1.0 = every query gives it all of its attention); then every linear of the block is
quantized by GPTQ on the float inputs, once with every token counting once and once with position 0 counting
`--sink-weight` times, and the relative output error ||(W - Q) x||^2 / ||W x||^2 is reported for position 0 and for
all other positions together. Written: the JSON given by --out (per block and a summary), printed at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import Clock, log, machine, write_json  # noqa: E402 - benchmarks/ is on sys.path as the script dir

from quant.gptq import attention_received, gptq_quantize_weights  # noqa: E402 - after the path setup above
from quant.int4 import dequantize  # noqa: E402
from runner import common  # noqa: E402
from runner.calibration import calibration_windows  # noqa: E402

# Linears fed the same input share one capture (q/k/v; gate/up), as in GPTQ's driver.
INPUTS = {
    "attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o_in": ("self_attn.o_proj",),
    "mlp_in": ("mlp.gate_proj", "mlp.up_proj"),
    "down_in": ("mlp.down_proj",),
}


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides on top of task=quantize quantizer=gptq")
    p.add_argument("--windows", type=int, default=4, help="calibration windows to run (of quantizer.nsamples)")
    p.add_argument("--sink-weight", type=float, default=256.0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args()


def _errors(W: torch.Tensor, Q: torch.Tensor, x: torch.Tensor) -> tuple[float, float]:
    """Relative output error ||(W - Q) x||^2 / ||W x||^2 on position 0 and on the other positions; x [S, T, K]."""
    y, e = x @ W.t(), x @ (W - Q).t()
    sink = (e[:, 0].square().sum() / y[:, 0].square().sum()).item()
    rest = (e[:, 1:].square().sum() / y[:, 1:].square().sum()).item()
    return sink, rest


def main() -> None:
    a = _args()
    if a.threads:
        torch.set_num_threads(a.threads)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["task=quantize", "quantizer=gptq", *a.overrides])
    q = OmegaConf.to_container(cfg.quantizer, resolve=True)
    knobs = {k: q[k] for k in ("groupsize", "blocksize", "percdamp", "act_order", "static_groups", "sym")}
    model, tok = common.load_model(cfg, apply_quantizer=False)
    ids = calibration_windows(cfg, tok)[: a.windows]
    S, T = ids.shape
    result = {"machine": machine(), "settings": {"windows": S, "seqlen": T, "sink_weight": a.sink_weight, **q}}
    blocks = []
    with Clock() as clock, torch.no_grad():
        x = model.embed(ids)
        layer_inputs = model.layer_inputs(torch.arange(T)[None], x.dtype)
        for i, block in enumerate(model.model.layers):
            cos, sin, mask = layer_inputs[block.layer_type]
            norms = x.float().norm(dim=-1)  # [S, T]
            received = attention_received(block, x, cos, sin, mask)  # [S, T], each row sums to T
            inputs: dict[str, torch.Tensor] = {}
            hooks = [
                block.get_submodule(names[0]).register_forward_pre_hook(
                    lambda mod, args, key=key, store=inputs: store.__setitem__(key, args[0].double())
                )
                for key, names in INPUTS.items()
            ]
            out = block(x, cos, sin, mask)
            for h in hooks:
                h.remove()
            row = {
                "block": i,
                "sink_norm": norms[:, 0].mean().item(),
                "other_norm_median": norms[:, 1:].median().item(),
                "sink_attention_share": (received[:, 0] / T).mean().item(),
                "layers": {},
            }
            for key, names in INPUTS.items():
                xin = inputs[key]  # [S, T, K]
                Ws = [block.get_submodule(n).weight.double() for n in names]
                for weight in (1.0, a.sink_weight):
                    xw = xin.clone()
                    xw[:, 0] *= weight**0.5
                    flat = xw.reshape(-1, xw.shape[-1])
                    H = 2 * flat.t() @ flat / S
                    for name, W, res in zip(names, Ws, gptq_quantize_weights(Ws, H, **knobs), strict=True):
                        Q = dequantize(res.q, res.scales.double(), res.zeros.double(), knobs["groupsize"], res.g_idx)
                        sink, rest = _errors(W, Q[:, : W.shape[1]], xin)
                        tag = "plain" if weight == 1.0 else "weighted"
                        row["layers"].setdefault(name, {})[tag] = {"sink_error": sink, "rest_error": rest}
            log(
                f"block {i}: sink norm {row['sink_norm']:.0f} vs {row['other_norm_median']:.0f}, "
                f"attention share {row['sink_attention_share']:.2f}"
            )
            blocks.append(row)
            x = out
    result["seconds"] = clock.wall
    result["blocks"] = blocks

    def mean(tag: str, field: str) -> float:
        vals = [layer[tag][field] for row in blocks for layer in row["layers"].values()]
        return sum(vals) / len(vals)

    result["summary"] = {
        tag: {field: mean(tag, field) for field in ("sink_error", "rest_error")} for tag in ("plain", "weighted")
    }
    write_json(a.out, result)
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
