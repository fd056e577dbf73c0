"""The GPTQ checkpoint format: our int4 models as the tensors transformers (through optimum and GPTQModel),
GPTQModel and vLLM load, and such checkpoints back into `quant.int4.Int4WeightOnlyLinear`.

Per quantized linear with weight W [N, K] (out, in features), group size g and G = ceil(K / g) groups, under the HF key
of the linear (`model.layers.0.self_attn.q_proj.qweight`, ...):

    qweight  int32 [K/8, N]   eight 4-bit q along the input dim: q[k, n] = (qweight[k // 8, n] >> 4 (k % 8)) & 15
    qzeros   int32 [G, N/8]   eight 4-bit zero points along the output dim:
                              z[j, n] = (qzeros[j, n // 8] >> 4 (n % 8)) & 15
    scales   fp16  [G, N]
    g_idx    int32 [K]        the group of each input column
    bias     the float Linear's bias, when it has one (its own dtype)

    W[n, k] = (q[k, n] - zero[g_idx[k], n]) * scales[g_idx[k], n]

`checkpoint_format` says what the packed zero points mean. `gptq` (v1, AutoGPTQ's original layout) stores zero - 1,
`gptq_v2` stores the zero point itself. We write `gptq` by default: transformers' `GPTQConfig` defaults to it
("`gptq` (v1) is supported by gptqmodel. `gptq_v2` is gptqmodel only", transformers 5.x
src/transformers/utils/quantization_config.py), and vLLM's GPTQ config reads the same key. GPTQModel converts v1 to its
internal v2 on load by adding 0x11111111 to every int32 word of qzeros, and back by subtracting it
(gptqmodel/utils/model.py, `convert_gptq_v1_to_v2_format_module` / `convert_gptq_v2_to_v1_format_module`). So
v1 cannot store a zero point of 0: its nibble would be -1 (0xF), which readers that add 1 per nibble after
masking (AutoGPTQ's unpacking) read as 16, and the word-wide add carries into the next nibble.
`to_gptq_checkpoint` refuses such a layer in v1 (asymmetric groups whose weights are all >= 0 give it); `gptq_v2`
stores it. Reading v1 we add 0x11111111 per word, as GPTQModel does, so a v1 file
GPTQModel wrote from zero points of 0 (with a borrow into the next nibble) reads back exactly.

Group sizes that do not divide in_features (SmolLM2's 576 at group 128): our int4 pads K up to whole groups with
zero columns; the GPTQ layout has no padding. vLLM refuses `in_features % group_size != 0`, so by default
`to_gptq_checkpoint` refuses such a layer, naming a group size that divides every in_features. With
`partial_groups=True` it writes GPTQModel's layout for them instead: the padded columns (which always meet zero
inputs) dropped, G = ceil(K / g) groups of which some hold fewer than g columns (GPTQModel's own buffers are
ceil(in_features / group_size) groups, with g_idx = k // g); GPTQModel loads it with its kernels that accept
`in_features % group_size != 0`, vLLM does not.

What `to_gptq_checkpoint` refuses, each with a one-line ValueError naming the layer and the fix:
- the partial groups above, unless `partial_groups=True`.
- K or N not a multiple of 8 (the int32 packing); mixed group sizes; float or int8 decoder linears; a scale that
  does not fit fp16.

`desc_act` in the written config is true exactly when g_idx is not the contiguous assignment k // g (GPTQ's
act-order without static groups): loaders ignore g_idx when desc_act is false (vLLM) and reorder the input when it
is true, so act-order with static groups (contiguous groups) is written as desc_act false. Our own record goes
into `quantization_config.meta.lmrunner`; `meta.quantizer` is ["lmrunner"]. GPTQModel's own loader
(`GPTQModel.load`, not the transformers path) refuses, in the versions read, a v1 `sym: false` checkpoint that its
meta does not name GPTQModel as having written; we do not claim to be GPTQModel, so for that loader write
asymmetric models as `gptq_v2`.

Reading (`from_gptq_checkpoint`): bits 4, quant_method gptq, checkpoint_format gptq or gptq_v2, int32 packing, one
group size > 0, lm_head not quantized, no per-module `dynamic` overrides. The result is a native state dict and a
`quantizer.json`-style record for `quant.prepare_for_load`; a K that is not a multiple of g (short groups, as
GPTQModel's buffers allow) is padded back to whole groups here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from quant.int4 import Int4WeightOnlyLinear, padded_in_features, unpack_int4
from quant.int8 import Int8WeightOnlyLinear

FORMATS = ("gptq", "gptq_v2")  # checkpoint_format values we read and write
_V1_OFFSET = 0x11111111  # v1 stores zero - 1 in every nibble: one word-wide add or subtract converts
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int64)  # nibble j of an int32 word holds bits 4j .. 4j+3
_SUPPORTED = "quant_method gptq, bits 4, checkpoint_format gptq or gptq_v2, pack_dtype int32"


# --- packing -----------------------------------------------------------------------------------------------------
def pack_int32(v: torch.Tensor) -> torch.Tensor:
    """v [R, C] with values 0..15 (R % 8 == 0) -> int32 [R/8, C]: rows 8i .. 8i+7 in nibbles 0 .. 7 of word i."""
    R, C = v.shape
    words = (v.to(torch.int64).view(R // 8, 8, C) << _SHIFTS.view(1, 8, 1)).sum(1)  # [R/8, C], 0 .. 2^32-1
    return _as_int32(words)


def unpack_int32(words: torch.Tensor) -> torch.Tensor:
    """int32 [R/8, C] -> int64 [R, C] with values 0..15; inverse of `pack_int32`."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    return ((w.unsqueeze(1) >> _SHIFTS.view(1, 8, 1)) & 0xF).reshape(-1, words.shape[1])


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 values in 0 .. 2^32-1 -> the int32 with the same 32 bits."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


# --- writing -----------------------------------------------------------------------------------------------------
def to_gptq_checkpoint(
    model: nn.Module, spec: Mapping, checkpoint_format: str = "gptq", partial_groups: bool = False
) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, quantization_config) of an int4 model (quantizer int4_wo or gptq) in the GPTQ layout.

    The state dict is the whole model's: every decoder linear as qweight/qzeros/scales/g_idx (+ bias) under its HF
    name, every other tensor (embeddings, norms, an untied lm_head) as the model holds it. `spec` is the model's
    `quantizer.json` record; the config is what goes under `quantization_config` in config.json.
    `partial_groups`: write layers whose in_features is not a multiple of the group size (see the module docstring).
    """
    if spec["name"] not in ("int4_wo", "gptq"):
        raise ValueError(
            f"quantizer {spec['name']!r} has no GPTQ form; export a model quantized with quantizer=int4_wo or gptq"
        )
    if checkpoint_format not in FORMATS:
        raise ValueError(f"checkpoint_format={checkpoint_format!r} is not supported; use one of {', '.join(FORMATS)}")
    layers = _int4_layers(model)
    groupsizes = sorted({m.groupsize for m in layers.values()})
    if len(groupsizes) != 1:
        raise ValueError(f"the decoder linears mix group sizes {groupsizes}; GPTQ has one: re-quantize the model")
    g = groupsizes[0]
    _check_whole_groups(layers, g, partial_groups)
    prefixes = tuple(f"{name}." for name in layers)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    for name, m in layers.items():
        sd.update(_gptq_tensors(name, m, spec["sym"], checkpoint_format))
    desc_act = any(m.g_idx is not None and not _is_contiguous(m.g_idx[: m.in_features], g) for m in layers.values())
    config = {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": g,
        "desc_act": desc_act,
        "sym": spec["sym"],
        "checkpoint_format": checkpoint_format,
        "pack_dtype": "int32",
        "lm_head": False,
        "meta": {"quantizer": ["lmrunner"], "lmrunner": dict(spec)},
    }
    return sd, config


def _int4_layers(model: nn.Module) -> dict[str, Int4WeightOnlyLinear]:
    """HF name -> Int4WeightOnlyLinear for every quantized linear of the decoder blocks; ValueError otherwise."""
    layers = {}
    for i, block in enumerate(model.model.layers):
        for name, module in block.named_modules():
            full = f"model.layers.{i}.{name}"
            if isinstance(module, nn.Linear | Int8WeightOnlyLinear):
                raise ValueError(
                    f"{full} is not int4-quantized; export a model quantized with quantizer=int4_wo or gptq"
                )
            if isinstance(module, Int4WeightOnlyLinear):
                layers[full] = module
    if not layers:
        raise ValueError(
            "the model has no int4 decoder linears; export a model quantized with quantizer=int4_wo or gptq"
        )
    return layers


def _check_whole_groups(layers: dict[str, Int4WeightOnlyLinear], g: int, partial_groups: bool) -> None:
    ks = {m.in_features for m in layers.values()}
    for name, m in layers.items():
        if m.in_features % g and not partial_groups:
            fits = [c for c in (128, 64, 32) if all(k % c == 0 for k in ks)]
            hint = (
                f"e.g. quantizer.groupsize={fits[0]}" if fits else f"every in_features is a multiple of {math.gcd(*ks)}"
            )
            raise ValueError(
                f"{name}: in_features {m.in_features} is not a multiple of groupsize {g}, and GPTQ checkpoints hold "
                f"whole groups only (vLLM refuses such layers); re-quantize with a groupsize dividing every "
                f"in_features ({hint}), or write partial groups (partial_groups=True: GPTQModel loads them, vLLM not)"
            )
        if m.in_features % 8 or m.out_features % 8:
            raise ValueError(
                f"{name}: in_features {m.in_features} and out_features {m.out_features} must be multiples of 8 "
                "for GPTQ's int32 packing; this layer cannot be exported as GPTQ"
            )


def _is_contiguous(g_idx: torch.Tensor, g: int) -> bool:
    return torch.equal(g_idx.long(), torch.arange(g_idx.numel(), device=g_idx.device) // g)


def _gptq_tensors(name: str, m: Int4WeightOnlyLinear, sym: bool, checkpoint_format: str) -> dict[str, torch.Tensor]:
    K, g = m.in_features, m.groupsize
    q = unpack_int4(m.qweight)[:, :K]  # [N, K]: padded columns dropped (they always meet zero inputs)
    zeros = m.zeros  # [N, G], integer-valued floats
    if not (torch.equal(zeros, zeros.round()) and zeros.min() >= 0 and zeros.max() <= 15):
        raise ValueError(f"{name}: zero points are not integers in 0..15; the module is corrupt, re-quantize it")
    if sym and bool((zeros != 8).any()):
        raise ValueError(f"{name}: quantizer.sym=true but the layer has zero points other than 8; fix the record")
    if checkpoint_format == "gptq" and bool((zeros == 0).any()):
        raise ValueError(
            f"{name}: a group has zero point 0, which checkpoint_format=gptq (v1, stores zero - 1) cannot hold; "
            "write checkpoint_format=gptq_v2 (GPTQModel loads it) or quantize with quantizer.sym=true"
        )
    scales = m.scales.to(torch.float16)
    if not bool(torch.isfinite(scales).all()) or bool(((scales == 0) & (m.scales != 0)).any()):
        raise ValueError(f"{name}: a scale does not fit fp16 (GPTQ stores fp16 scales); this layer cannot be exported")
    g_idx = m.g_idx[:K] if m.g_idx is not None else torch.arange(K, device=q.device) // g
    stored = zeros.long() - 1 if checkpoint_format == "gptq" else zeros.long()  # [N, G]
    out = {
        f"{name}.qweight": pack_int32(q.t()),  # [K/8, N]
        f"{name}.qzeros": pack_int32(stored).t().contiguous(),  # [G, N/8]
        f"{name}.scales": scales.t().contiguous(),  # [G, N]
        f"{name}.g_idx": g_idx.to(torch.int32).contiguous(),  # [K]
    }
    if m.bias is not None:
        out[f"{name}.bias"] = m.bias.detach().contiguous()
    return out


# --- reading -----------------------------------------------------------------------------------------------------
def from_gptq_checkpoint(
    state_dict: Mapping[str, torch.Tensor], quantization_config: Mapping, model: nn.Module
) -> tuple[dict[str, torch.Tensor], dict]:
    """(native state dict, quantizer record) of a GPTQ checkpoint's tensors for `model`, a float Transformer of the
    checkpoint's architecture (any device, meta included: only its decoder linears' names and sizes are read).

    Load with `quant.prepare_for_load(model, record)` then `load_state_dict(sd, assign=True)`. The record is `gptq`'s
    (the shells need its groupsize, act_order and static_groups); the knobs a GPTQ config does not carry (calibration
    and solver settings) are placeholders, since only the storage knobs shape the loaded modules.
    """
    g, sym, fmt, desc_act = _read_config(quantization_config)
    linears = {
        f"model.layers.{i}.{name}": module
        for i, block in enumerate(model.model.layers)
        for name, module in block.named_modules()
        if isinstance(module, nn.Linear)
    }
    sd = dict(state_dict)
    layers = {}
    for name, linear in linears.items():
        if f"{name}.weight" in sd:
            raise ValueError(
                f"{name} is float in this GPTQ checkpoint; checkpoints with unquantized decoder linears are not "
                "supported"
            )
        layers[name] = _read_layer(name, sd, linear, g, fmt, sym)
    has_g_idx = any(not _is_contiguous(gi, g) for _, _, _, gi in layers.values())
    if has_g_idx and not desc_act:
        name = next(n for n, (*_, gi) in layers.items() if not _is_contiguous(gi, g))
        raise ValueError(
            f"{name}.g_idx is not the contiguous assignment k // group_size but quantization_config.desc_act is "
            "false, so GPTQ loaders would ignore it; the checkpoint is inconsistent (set desc_act: true if g_idx is "
            "right)"
        )
    for name, (q, scales, zeros, g_idx) in layers.items():
        linear = linears[name]
        qm = Int4WeightOnlyLinear.from_quantized(
            q, scales, zeros, _padded_g_idx(g_idx, g, q.shape[1]) if has_g_idx else None, linear.in_features, None
        )
        for key in ("qweight", "scales", "zeros", "g_idx"):
            tensor = getattr(qm, key)
            if tensor is not None:
                sd[f"{name}.{key}"] = tensor
    record = {
        "name": "gptq",
        "groupsize": g,
        "sym": sym,
        "blocksize": 128,
        "percdamp": 0.01,
        "act_order": desc_act,
        "static_groups": desc_act and not has_g_idx,
        "true_sequential": True,
        "nsamples": 1,
        "seqlen": 1,
        "calibration": f"unknown: imported from a GPTQ checkpoint (checkpoint_format {fmt})",
        "sampling": "corpus",
        "seed": 0,
        "sink_weight": 1,
        "attention_weight": False,
        "scale_search": False,
    }
    return sd, record


def _read_config(qc: Mapping) -> tuple[int, bool, str, bool]:
    """(group size, sym, checkpoint_format, desc_act) of a quantization_config; ValueError for what we cannot load."""
    method = qc.get("quant_method")
    if method != "gptq":
        raise ValueError(f"quantization_config.quant_method={method!r} is not supported; supported: {_SUPPORTED}")
    if qc.get("bits") != 4:
        raise ValueError(f"quantization_config.bits={qc.get('bits')!r} is not supported; supported: {_SUPPORTED}")
    fmts = {qc[k] for k in ("checkpoint_format", "format") if qc.get(k) is not None}
    if len(fmts) > 1:
        raise ValueError(f"quantization_config has conflicting checkpoint_format and format {sorted(fmts)}; keep one")
    fmt = fmts.pop() if fmts else "gptq"  # transformers' GPTQConfig default
    if fmt not in FORMATS:
        raise ValueError(f"quantization_config.checkpoint_format={fmt!r} is not supported; supported: {_SUPPORTED}")
    if qc.get("pack_dtype", "int32") != "int32":
        raise ValueError(
            f"quantization_config.pack_dtype={qc['pack_dtype']!r} is not supported; supported: {_SUPPORTED}"
        )
    g = qc.get("group_size")
    if not isinstance(g, int) or isinstance(g, bool) or g <= 0 or g % 2:
        raise ValueError(
            f"quantization_config.group_size={g!r} is not supported; a positive even group size is (-1, one group "
            "per row, is not)"
        )
    if qc.get("lm_head"):
        raise ValueError(
            "quantization_config.lm_head=true (a quantized output head) is not supported; only decoder linears"
        )
    if qc.get("dynamic"):
        raise ValueError(
            "quantization_config.dynamic (per-module overrides) is not supported; one config for all layers"
        )
    sym, desc_act = qc.get("sym", True), qc.get("desc_act", False)  # GPTQConfig's defaults
    if not isinstance(sym, bool) or not isinstance(desc_act, bool):
        raise ValueError(f"quantization_config.sym={sym!r} / desc_act={desc_act!r} must be true or false")
    return g, sym, fmt, desc_act


def _read_layer(name: str, sd: dict, linear: nn.Linear, g: int, fmt: str, sym: bool) -> tuple:
    """q uint8 [N, Kp], scales and zeros fp32 [N, G], g_idx int64 [K] of one layer, popped from sd."""
    N, K = linear.out_features, linear.in_features
    G = -(-K // g)

    def take(key: str, shape: tuple, dtypes: tuple) -> torch.Tensor:
        full = f"{name}.{key}"
        if full not in sd:
            raise ValueError(f"{full} is missing from the GPTQ checkpoint; every quantized linear needs it")
        t = sd.pop(full)
        if tuple(t.shape) != shape:
            raise ValueError(f"{full} has shape {tuple(t.shape)}, expected {shape} for a {N}x{K} layer at group {g}")
        if t.dtype not in dtypes:
            raise ValueError(f"{full} has dtype {t.dtype}, expected one of {[str(d) for d in dtypes]}")
        return t

    if K % 8 or N % 8:
        raise ValueError(
            f"{name}: a {N}x{K} layer cannot hold GPTQ's int32 packing (both sizes must be multiples of 8)"
        )
    qweight = take("qweight", (K // 8, N), (torch.int32,))
    qzeros = take("qzeros", (G, N // 8), (torch.int32,))
    scales = take("scales", (G, N), (torch.float16, torch.bfloat16, torch.float32))
    g_idx = take("g_idx", (K,), (torch.int32, torch.int64)) if f"{name}.g_idx" in sd else None
    if g_idx is None:  # old GPTQ-for-LLaMa files without act-order carry none
        g_idx = torch.arange(K) // g
    g_idx = g_idx.long()
    if bool((g_idx < 0).any()) or bool((g_idx >= G).any()):
        raise ValueError(f"{name}.g_idx holds groups outside 0..{G - 1}; the checkpoint is corrupt")
    counts = torch.bincount(g_idx, minlength=G)
    if bool((counts > g).any()):
        j = int(torch.argmax(counts))
        raise ValueError(f"{name}.g_idx puts {int(counts[j])} columns in group {j}, more than group_size {g}")
    if fmt == "gptq":
        words = qzeros.to(torch.int64) & 0xFFFFFFFF
        qzeros = _as_int32(words + _V1_OFFSET)
    zeros = unpack_int32(qzeros.t().contiguous())  # [N, G]
    if sym and bool((zeros != 8).any()):
        raise ValueError(
            f"{name}.qzeros holds zero points other than 8 but quantization_config.sym is true (loaders then "
            "assume 8); the checkpoint is inconsistent"
        )
    q = unpack_int32(qweight).t()  # [N, K]
    Kp = padded_in_features(K, g)
    q_full = torch.empty(N, Kp, dtype=torch.uint8)
    q_full[:, :K] = q
    if Kp > K:  # padded columns hold their group's zero point, so they dequantize to exactly 0
        pad_groups = _pad_groups(g_idx, g, Kp)
        q_full[:, K:] = zeros[:, pad_groups].to(torch.uint8)
    return q_full, scales.float().t().contiguous(), zeros.float().contiguous(), g_idx


def _pad_groups(g_idx: torch.Tensor, g: int, Kp: int) -> torch.Tensor:
    """Groups of the padded columns K .. Kp-1: each group short of g columns gets its deficit, lowest group first
    (GPTQ's act-order puts the dead padded columns in index order, so this is where our quantizer had them)."""
    G = Kp // g
    deficit = g - torch.bincount(g_idx, minlength=G)
    return torch.repeat_interleave(torch.arange(G), deficit)


def _padded_g_idx(g_idx: torch.Tensor, g: int, Kp: int) -> torch.Tensor:
    return torch.cat([g_idx, _pad_groups(g_idx, g, Kp)]).to(torch.int32)
