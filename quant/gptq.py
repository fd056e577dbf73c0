"""GPTQ int4 weight-only quantization (Frantar et al. 2022, https://arxiv.org/abs/2210.17323), written natively.

Per linear layer with weight W [N, K] and calibration inputs X, GPTQ minimises ||W X - Q X||^2 column by column:
quantize column j, then spread its error over the not-yet-quantized columns through the inverse Hessian
H^-1 = (2 X X^T)^-1, using the upper Cholesky factor U of H^-1 so that the row U[j, j:] is exactly the update
the paper's Algorithm 1 needs. Steps, as in the paper and its reference code (IST-DASLab/gptq):

- H = 2/n * sum_i x_i x_i^T over the calibration tokens, kept as a running average (n counts sequences).
- Dead inputs (H[i, i] == 0) get H[i, i] = 1 and W[:, i] = 0.
- Damping: H += percdamp * mean(diag H) * I, then U = cholesky(cholesky_inverse(cholesky(H)), upper=True).
- Lazy batch updates: columns are processed in blocks of `blocksize`; inside a block each column receives the
  updates of the block's earlier columns just before it is quantized (one matrix-vector product), the rest of W
  gets the whole block's update in one matmul at the block end. This reorders the arithmetic only; the result
  is that of the column-by-column algorithm (held to identical integers by the tests).
- Linears that share one Hessian (q/k/v, gate/up) are solved as one row-stacked matrix: GPTQ never mixes rows,
  so each gets the result it would get alone, with one factorisation and one column loop for all.
- Groups: a group's scale/zero is chosen when its first column is reached, from the group's weights as updated
  so far (including pending updates from earlier columns of the current block -- the reference code reads
  the block-stale W there when groupsize < blocksize; we keep the algorithm's definition, see the tests).
- act_order: columns are processed in order of decreasing diag(H). Without `static_groups`, groups are formed
  along that order and `g_idx` records each column's group; with `static_groups`, groups are the natural
  contiguous ones with qparams computed up front from the (dead-zeroed) unpermuted weight, so no g_idx.
- Token weights (this project's departure from the paper, `quantizer.sink_weight` / `attention_weight`): H sums
  w_t x_t x_t^T, so a token of weight w counts as w copies of it. Position 0 of each calibration window is an
  attention sink (residual norm ~100x the others on SmolLM2) whose errors reach every later token; weighting it
  is what makes GPTQ beat round-to-nearest on that model (README). Weight 1 everywhere is the paper's H.
- Grids: min-max per group (the paper), or with `scale_search` the scale that minimises the group's round-trip
  error weighted by diag(H) and each weight's magnitude (`search_importance`, quant.int4.search_qparams), chosen
  when the group's first column is reached.
- sym: zero fixed to 8, scale = signed max / -8 (llama.cpp's Q4_0 grid). Padding: K is padded to a multiple of
  the group size with zero columns whose H rows and columns are zero (their inputs are always 0); they are dead, decoupled from the real columns, and
  quantize to exactly 0, so padding changes nothing for the real columns.

`gptq_quantize_model` runs the sequential recipe over a `models.llama.Transformer` of any family: embed the
calibration batch (`Transformer.embed`), then per decoder block capture each linear's Hessian with forward pre-hooks
(one fp32 matmul per chunk), quantize, and feed the batch through the quantized block to produce the next block's
inputs. The block runs only through its own methods (`Block.attn_branch`, `mlp_branch`, `finish_attn`,
`finish_mlp`, `attention_probs`) with the RoPE and mask of its layer type (`Transformer.layer_inputs`: a sliding
layer sees only its window, Gemma 3's local layers their own RoPE base): this file never re-writes its norms,
residual adds or attention, and the norms (Gemma's four per block, Qwen3's q/k norms) are never quantized. With
`true_sequential` the groups q/k/v, o, gate/up, down are quantized in turn, each calibrated on the outputs of the
already-quantized groups (see `_sequential_block` for how this avoids re-running the whole block per group).
Memory holds a few [nsamples, seqlen, hidden] activation buffers of one block; the block runs in chunks of about
`_CHUNK_TOKENS` tokens.

Self-check: every layer's output-space SQNR on the calibration inputs, 10 log10(tr(W H W^T) / tr(E H E^T))
with E the quantization error, must clear `_MIN_SQNR_DB`, or quantization stops with an error.

Scheme `gptq` (conf/quantizer/gptq.yaml; the record `GPTQ` at the end): same int4 storage as int4_wo, plus a g_idx
when act_order forms groups without static_groups. Needs calibration token ids [nsamples, seqlen], which the runner
builds from `calibration` with `sampling` and `seed` (runner/calibration.py).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from quant.head import HEAD_CHOICES
from quant.int4 import MAXQ, Int4WeightOnlyLinear, dequantize, group_qparams, padded_in_features, search_qparams
from quant.int4_wo import int4_shell
from quant.scheme import (
    Quantizer,
    any_value,
    boolean,
    non_negative_int,
    number_at_least_zero,
    one_of,
    positive_even_int,
    positive_int,
    positive_number,
)

log = logging.getLogger(__name__)

# Measured 22-47 dB on SmolLM2-135M's layers at group 64/128 (about 6 dB per bit); a layer under 10 dB means a
# broken Hessian or a bug, not a hard layer.
_MIN_SQNR_DB = 10.0
# Tokens per block call during calibration: bounds the attention and MLP intermediates (8192 x intermediate_size
# floats) while keeping the GEMMs large.
_CHUNK_TOKENS = 8192
# The per-layer solve (Cholesky factors of the damped inverse Hessian, error feedback) in float64 on CPU. SmolLM2's
# Hessians span many orders of magnitude (a few outlier channels); in float32 the factors lose enough digits to
# flip roundings that the sequential recipe then carries through later blocks. Measured (benchmarks/quantize.py
# --reference, 8 x 2048 C4 tokens, g128 act-order, 4 WikiText-2 windows): float64 gives the column-by-column
# reference's perplexity exactly, float32 2.6% higher. The float64 solve takes about 1.7x the float32 one (real
# Hessians of two blocks, one thread), about a tenth of GPTQ's time in the shipped setting. CUDA keeps float32, as
# the reference code does: float64 is slow on most GPUs.
CPU_SOLVE_DTYPE = torch.float64  # the default of gptq_quantize_model(cpu_solve_dtype=...)

# The linears of models.llama.Block in call order, grouped as the reference's --true-sequential: each group is
# quantized before the inputs of the next group are captured. Every family has these same linears (Phi-3's fused
# qkv_proj / gate_up_proj are split when its checkpoint loads, models/checkpoint.py).
_SEQUENTIAL_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


@dataclass
class GPTQResult:
    q: torch.Tensor  # uint8 [N, Kp], values 0..15, original column order
    scales: torch.Tensor  # fp32 [N, G]
    zeros: torch.Tensor  # fp32 [N, G], integer-valued
    g_idx: torch.Tensor | None  # int32 [Kp]: group of each column (act_order without static_groups), else None
    loss: float  # the reference's error: sum_j ||w_j - q_j||^2 / (2 U[j, j]^2)
    sqnr_db: float  # output-space SQNR on the calibration inputs (see module docstring)


def gptq_quantize_weight(W: torch.Tensor, H: torch.Tensor, **knobs) -> GPTQResult:
    """GPTQ for one weight W [N, K] given its Hessian H [K, K] (2/n sum x x^T); knobs as `gptq_quantize_weights`.
    Neither input is modified.

    Runs in fp64 when W is fp64 (the model driver on CPU, see CPU_SOLVE_DTYPE; the tests, to compare with the
    column-by-column algorithm without rounding flips), else in fp32.
    """
    return gptq_quantize_weights([W], H, **knobs)[0]


def search_importance(h_diag: torch.Tensor, w: torch.Tensor, row_ms: torch.Tensor) -> torch.Tensor:
    """Importance [N, ..., g] of each weight in `scale_search`: its column's Hessian diagonal h_diag (the column's
    squared inputs, [..., g]) times sqrt(row_ms + w^2), row_ms [N] being the row's mean squared weight -- the
    weighting llama.cpp's Q4_0/Q4_1 quantizers give an importance matrix, so larger weights of a column also count
    more. Measured on SmolLM2 at sym g32 (16 windows): 22.26 against 22.45 with the column factor alone."""
    return h_diag * (row_ms.view(-1, *([1] * (w.dim() - 1))) + w * w).sqrt()


def gptq_quantize_weights(
    Ws: list[torch.Tensor],
    H: torch.Tensor,
    *,
    groupsize: int,
    blocksize: int,
    percdamp: float,
    act_order: bool,
    static_groups: bool,
    sym: bool,
    scale_search: bool = False,
) -> list[GPTQResult]:
    """GPTQ for several weights [N_i, K] that share one Hessian H [K, K] (q/k/v, gate/up), one result each.

    GPTQ treats the rows of W independently (each row's error feedback and group grid are its own), so the
    weights are stacked into one [sum N_i, K] matrix: one Cholesky factorisation and one column loop serve them all,
    and each result is what `gptq_quantize_weight` would give that weight alone.

    The loop works on W transposed ([Kp, N], a column of W is a contiguous row) and updates a column just before
    it is quantized, with one matrix-vector product over the errors of the block's earlier columns; the paper's
    rank-1 update of every later column after each step does the same arithmetic in more, smaller operations.
    """
    N_i = [w.shape[0] for w in Ws]
    K = Ws[0].shape[1]
    g = groupsize
    Kp = padded_in_features(K, g)
    dt = torch.float64 if Ws[0].dtype == torch.float64 else torch.float32
    dev = Ws[0].device
    W0 = torch.cat([w.detach().to(dt) for w in Ws])  # [N, K]
    N = W0.shape[0]
    W = torch.zeros(Kp, N, dtype=dt, device=dev)  # transposed
    W[:K] = W0.t()
    H0 = H.to(dt)
    H = torch.zeros(Kp, Kp, dtype=dt, device=dev)
    H[:K, :K] = H0

    dead = H.diagonal() == 0  # includes the padded columns
    H[dead, dead] = 1
    W[dead] = 0
    damp = percdamp * H.diagonal()[:K].mean()  # over real columns only, so padding does not change it

    row_ms = (W0 * W0).mean(1)  # [N]: each row's mean squared weight, for the search's per-weight importance

    def qparams(w, cols):  # w [N, ..., g]: the grid of each group; cols: its columns' indices into H
        if not scale_search:
            return group_qparams(w, sym)
        return search_qparams(w, sym, search_importance(H.diagonal()[cols], w, row_ms))

    if static_groups:  # [N, G, 1] on the unpermuted weight
        s_static, z_static = qparams(W.t().reshape(N, Kp // g, g), torch.arange(Kp, device=dev).view(Kp // g, g))
    perm = None
    if act_order:
        # stable: ties (e.g. dead columns, all at 1) order the same way on every device
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        W, H = W[perm], H[perm[:, None], perm]
    static = None  # per-column (scale, zero) [Kp, N] in permuted order, with static_groups
    if static_groups:
        col_group = (perm if act_order else torch.arange(Kp, device=dev)) // g  # [Kp], permuted order
        static = (s_static[:, col_group, 0].t().contiguous(), z_static[:, col_group, 0].t().contiguous())

    H.diagonal().add_(damp)
    try:
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError as e:
        raise RuntimeError("GPTQ: damped Hessian is not positive definite; increase quantizer.percdamp") from e

    Q, scales, zeros, losses = _column_loop(W, U, g, blocksize, qparams, static)

    g_idx = None
    if act_order:
        inv = torch.argsort(perm)
        Q = Q[inv]
        if not static_groups:
            g_idx = (torch.arange(Kp, device=dev) // g)[inv].to(torch.int32)
    if static_groups:
        scales, zeros = s_static[..., 0], z_static[..., 0]
    else:
        scales, zeros = scales.t(), zeros.t()

    return _split_results(N_i, W0, H0, Q, scales, zeros, g_idx, losses, g)


def _column_loop(W, U, g, blocksize, qparams, static) -> tuple:
    """GPTQ's column loop over W [Kp, N] (transposed, permuted order; updated in place) with U the upper Cholesky
    factor of the damped inverse Hessian. Group grids come from `qparams(group [N, g], columns)` when a group's
    first column is reached, or per column from `static` = (scale, zero) [Kp, N]. Returns Q [Kp, N]
    (integer-valued), scales and zeros [G, N] (unused with `static`) and the per-row losses [N]."""
    Kp, N = W.shape
    dt, dev = W.dtype, W.device
    d = U.diagonal().tolist()
    Q = torch.empty_like(W)  # integer-valued, [Kp, N], permuted column order
    Err = torch.empty(min(blocksize, Kp), N, dtype=dt, device=dev)  # the current block's scaled errors
    losses = torch.zeros(N, dtype=dt, device=dev)
    scales = torch.zeros(Kp // g, N, dtype=dt, device=dev)
    zeros = torch.zeros_like(scales)
    for i1 in range(0, Kp, blocksize):
        i2 = min(i1 + blocksize, Kp)
        for col in range(i1, i2):
            i = col - i1
            E, u = Err[:i].t(), U[i1:col]  # the block's errors so far [N, i] and their rows of U [i, Kp]
            if static is not None:
                scale, zero = static[0][col], static[1][col]
            elif col % g == 0:
                grp = W[col : col + g] - u[:, col : col + g].t() @ E.t()  # [g, N], up to date
                scale, zero = qparams(grp.t(), slice(col, col + g))  # [N, 1]
                scale, zero = scale[:, 0], zero[:, 0]
                scales[col // g], zeros[col // g] = scale, zero
            w = torch.addmv(W[col], E, u[:, col], alpha=-1)  # column col with this block's pending updates
            q = torch.div(w, scale, out=Q[col]).round_().add_(zero).clamp_(0, MAXQ)  # quantize_values, in place
            err = torch.sub(q, zero, out=Err[i]).mul_(scale)
            torch.sub(w, err, out=err).div_(d[col])
        B = i2 - i1
        losses += Err[:B].square().sum(0)
        W[i2:].addmm_(U[i1:i2, i2:].t(), Err[:B], alpha=-1)

    return Q, scales, zeros, losses


def _split_results(N_i, W0, H0, Q, scales, zeros, g_idx, losses, g) -> list[GPTQResult]:
    """One GPTQResult per stacked weight (rows N_i of Q [Kp, N], scales/zeros [N, G]), with its output-space SQNR
    on the calibration inputs: 10 log10(tr(W H W^T) / tr(E H E^T)), E the quantization error."""
    K = W0.shape[1]
    # Self-check in fp32: a dB figure needs no more, and fp32 halves the cost of these two [N, K] x [K, K] products.
    W0, H0 = W0.float(), H0.float()
    E = W0 - dequantize(Q.t(), scales.float(), zeros.float(), g, g_idx)[:, :K]  # [N, K]
    signal, noise = ((W0 @ H0) * W0).sum(1), ((E @ H0) * E).sum(1)  # per row
    results, r0 = [], 0
    for n in N_i:
        r = slice(r0, r0 + n)
        r0 += n
        s, e = signal[r].sum(), noise[r].sum()
        # exact reconstruction is +inf; NaN anywhere stays NaN, so the self-check catches it
        sqnr_db = math.inf if e == 0 else (10 * torch.log10(s / e)).item()
        results.append(
            GPTQResult(
                q=Q[:, r].t().to(torch.uint8).contiguous(),
                scales=scales[r].float().contiguous(),
                zeros=zeros[r].float().contiguous(),
                g_idx=None if g_idx is None else g_idx.clone(),  # a tensor of its own per layer
                loss=losses[r].sum().item() / 2,
                sqnr_db=sqnr_db,
            )
        )
    return results


class _Hessian:
    """Running average H = 2/n sum_t w_t x_t x_t^T over n sequences, one fp32 matmul per chunk (as the reference's
    add_batch). w_t is the token's weight (1 for every token in the paper's GPTQ): a token of weight w counts exactly
    as w copies of it would."""

    def __init__(self, k: int, device: torch.device):
        self.H = torch.zeros(k, k, dtype=torch.float32, device=device)
        self.nsamples = 0

    def add(self, x: torch.Tensor, sqrt_w: torch.Tensor | None = None):
        # x: [B, T, K]; sqrt_w: [B, T], the square roots of the tokens' weights, or None (all 1)
        n = self.nsamples + x.shape[0]
        x2 = x.float() if sqrt_w is None else x.float() * sqrt_w[..., None].float()
        x2 = x2.reshape(-1, x.shape[-1])  # [B*T, K]
        self.H.addmm_(x2.t(), x2, beta=self.nsamples / n, alpha=2 / n)
        self.nsamples = n


class _StopForward(Exception):
    """Raised by a capture hook once every input it needs from this chunk is in: the rest is not computed."""


def _capture(
    block: nn.Module,
    names: tuple[str, ...],
    run: Callable[[int, int], object],
    n_seq: int,
    chunk: int,
    sqrt_w: torch.Tensor | None,
    keep: str | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Hessians of the inputs of `block`'s linears `names`, calling `run(start, end)` on each chunk of sequences;
    `sqrt_w` [n_seq, T]: square roots of the tokens' Hessian weights (see `token_weights`), or None.

    Forward pre-hooks read the inputs and stop the forward as soon as the last needed input arrived. Linears
    called on the very same tensor (q/k/v; gate/up) share one Hessian; the first chunk finds who shares, later
    chunks stop at the first linear of each sharing set, so e.g. k and v are not computed just to be captured.
    `keep` names one linear whose input is also stored for all sequences and returned (o_proj's, see below).
    """
    hessians: dict[str, _Hessian] = {}
    feeders: list[str] = []  # one linear per distinct input, in call order
    kept: list[torch.Tensor | None] = [None]
    state: dict = {}

    def make_hook(name: str):
        def hook(module, args):
            inp = args[0]  # [B, T, K]
            if name == keep:
                if kept[0] is None:
                    kept[0] = inp.new_empty((n_seq, *inp.shape[1:]))
                kept[0][state["start"] : state["start"] + inp.shape[0]] = inp
            last = state["last"]
            if last is not None and last[0] is inp:
                if hessians.setdefault(name, last[1]) is not last[1]:
                    raise RuntimeError(f"GPTQ: {name} changed input sharing between calibration chunks")
            else:
                if name not in hessians:
                    hessians[name] = _Hessian(inp.shape[-1], inp.device)
                    feeders.append(name)
                s0 = state["start"]
                hessians[name].add(inp, None if sqrt_w is None else sqrt_w[s0 : s0 + inp.shape[0]])
                state["last"] = (inp, hessians[name])
            state["seen"].add(name)
            if state["seen"] >= state["needed"]:
                raise _StopForward

        return hook

    handles = [block.get_submodule(n).register_forward_pre_hook(make_hook(n)) for n in names]
    try:
        for start in range(0, n_seq, chunk):
            needed = set(names) if start == 0 else set(feeders)
            state.update(last=None, seen=set(), start=start, needed=needed)
            try:
                run(start, min(start + chunk, n_seq))
            except _StopForward:
                pass
            if not state["seen"] >= needed:
                raise RuntimeError(f"GPTQ: linears {sorted(needed - state['seen'])} were not called by the forward")
    finally:
        for h in handles:
            h.remove()
    return {name: h.H for name, h in hessians.items()}, kept[0]


@dataclass(frozen=True)
class _Solver:
    """How `_quantize_group` solves: `solve(Ws, H, **knobs)` (gptq_quantize_weights' contract) in `cpu_dtype` on CPU.
    The block drivers pass it along as their `knobs` argument."""

    knobs: dict
    cpu_dtype: torch.dtype
    solve: Callable[..., list[GPTQResult]]


def _quantize_group(block: nn.Module, index: int, names, hessians, solver: _Solver, results: dict) -> None:
    # Linears fed the very same input (q/k/v; gate/up) share one Hessian object and are solved together.
    shared: dict[int, list[str]] = {}
    for name in names:
        shared.setdefault(id(hessians[name]), []).append(name)
    for group in shared.values():
        linears = [block.get_submodule(n) for n in group]
        # On CPU the per-layer solve runs in float64 (see CPU_SOLVE_DTYPE); the Hessian was accumulated in float32.
        dt = solver.cpu_dtype if linears[0].weight.device.type == "cpu" else torch.float32
        H = hessians[group[0]].to(dt)
        for name, linear, res in zip(
            group, linears, solver.solve([m.weight.to(dt) for m in linears], H, **solver.knobs), strict=True
        ):
            log.debug("block %d %s: loss %.4g, output SQNR %.1f dB", index, name, res.loss, res.sqnr_db)
            if not res.sqnr_db >= _MIN_SQNR_DB:  # also catches NaN
                raise RuntimeError(
                    f"GPTQ self-check: block {index} {name} output SQNR {res.sqnr_db:.1f} dB < {_MIN_SQNR_DB} dB"
                )
            # Later captures and the block output must see this layer quantized: write the dequantized weight (what
            # Int4WeightOnlyLinear's portable path computes) into the float layer until the block is done.
            wq = dequantize(res.q, res.scales, res.zeros, solver.knobs["groupsize"], res.g_idx)
            linear.weight.copy_(wq[:, : linear.in_features])
            results[name] = res


def _sequential_block(block, index, x, cos, sin, mask, chunk, knobs, results, sqrt_w) -> torch.Tensor:
    """true_sequential: q/k/v, then o, then gate/up, then down, each calibrated on its quantized predecessors.

    The reference re-runs the whole block for each group. Here each capture runs only the residual branch it
    needs (`Block.attn_branch`, `Block.mlp_branch`), and the inputs of o_proj and down_proj are kept from their
    captures (one block's activations) and finished with `Block.finish_attn` / `finish_mlp` once those linears are
    quantized, so the attention and gate/up each run once per block after their own quantization, where the
    reference runs the whole block five times; the values are the ones the block's own forward computes.
    tests/quant/test_gptq.py holds it to a driver that re-runs `block(x)`.
    """
    n_seq = x.shape[0]
    qkv, o, gate_up, down = _SEQUENTIAL_GROUPS

    def run_attn(s, e):
        block.attn_branch(x[s:e], cos, sin, mask)

    hessians, _ = _capture(block, qkv, run_attn, n_seq, chunk, sqrt_w)
    _quantize_group(block, index, qkv, hessians, knobs, results)
    hessians, context = _capture(block, o, run_attn, n_seq, chunk, sqrt_w, keep=o[0])  # context: [S, T, H*D]
    _quantize_group(block, index, o, hessians, knobs, results)
    h = torch.empty_like(x)
    for s in range(0, n_seq, chunk):
        h[s : s + chunk] = block.finish_attn(x[s : s + chunk], context[s : s + chunk])
    del context

    def run_mlp(s, e):
        block.mlp_branch(h[s:e])

    hessians, _ = _capture(block, gate_up, run_mlp, n_seq, chunk, sqrt_w)
    _quantize_group(block, index, gate_up, hessians, knobs, results)
    hessians, act = _capture(block, down, run_mlp, n_seq, chunk, sqrt_w, keep=down[0])  # act: [S, T, intermediate]
    _quantize_group(block, index, down, hessians, knobs, results)
    for s in range(0, n_seq, chunk):
        h[s : s + chunk] = block.finish_mlp(h[s : s + chunk], act[s : s + chunk])
    return h


def _all_at_once_block(block, index, x, cos, sin, mask, chunk, knobs, results, sqrt_w) -> torch.Tensor:
    """Not true_sequential: every linear calibrated on the float block's inputs, as the reference's default."""
    names = sum(_SEQUENTIAL_GROUPS, ())
    n_seq = x.shape[0]
    hessians, _ = _capture(block, names, lambda s, e: block(x[s:e], cos, sin, mask), n_seq, chunk, sqrt_w)
    _quantize_group(block, index, names, hessians, knobs, results)
    out = torch.empty_like(x)
    for s in range(0, n_seq, chunk):
        out[s : s + chunk] = block(x[s : s + chunk], cos, sin, mask)
    return out


def attention_received(
    block: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """[S, T]: how much attention each token receives in `block`'s self-attention on inputs x [S, T, C] (under
    `mask`, [1, 1, T, T] from `Transformer.layer_inputs`; None: causal), summed over the queries and averaged over
    the heads, so each sequence's row sums to T (mean 1 per token).

    The attention sink (position 0) receives most of every query's attention: its value is near T times the
    share it gets, hundreds for 1024-token windows, where later tokens receive about 1 or less.
    """
    S, T, _ = x.shape
    out = torch.empty(S, T, dtype=torch.float32, device=x.device)
    for s in range(S):  # one sequence at a time: the probabilities are [H, T, T]
        out[s] = block.attention_probs(x[s : s + 1], cos, sin, mask).sum(2).mean(1)[0]
    return out


def token_weights(
    block: nn.Module, x: torch.Tensor, cos, sin, sink_weight: float, attention_weight: bool, mask=None
) -> torch.Tensor | None:
    """[S, T] weight of each calibration token in `block`'s Hessians, or None when every token counts once.

    `attention_weight`: each token counts as much as the attention it receives in this block (RSQ, Sung et al.
    2025, arXiv 2503.01820); `sink_weight`: position 0 of every window (the attention sink) counts that many times
    more. With neither, every token counts once: the paper's GPTQ.
    """
    if sink_weight == 1 and not attention_weight:
        return None
    S, T = x.shape[:2]
    w = attention_received(block, x, cos, sin, mask) if attention_weight else torch.ones(S, T, device=x.device)
    w[:, 0] *= sink_weight
    return w


def gptq_quantize_model(
    model: nn.Module,
    calib_ids: torch.Tensor,
    qcfg: dict,
    progress: bool = True,
    *,
    cpu_solve_dtype: torch.dtype = CPU_SOLVE_DTYPE,
    solve: Callable[..., list[GPTQResult]] = gptq_quantize_weights,
) -> nn.Module:
    """Quantize every linear in `model.model.layers` with GPTQ, in place; returns the model.

    calib_ids: LongTensor [nsamples, seqlen] (must match qcfg's nsamples and seqlen, which quantizer.json
    records). qcfg: the resolved `quantizer` config (see quant.base). The linears become Int4WeightOnlyLinear.
    For experiments (not config knobs: quantizer.json does not record them): `cpu_solve_dtype`, the dtype of the
    per-layer solve on CPU (CUDA solves in float32); `solve`, the per-layer solver with gptq_quantize_weights'
    contract (benchmarks/quantize.py --reference passes quant/gptq_reference.py's Algorithm 1 through it).
    """
    if calib_ids.ndim != 2 or tuple(calib_ids.shape) != (qcfg["nsamples"], qcfg["seqlen"]):
        raise ValueError(
            f"GPTQ calibration ids have shape {tuple(calib_ids.shape)}, but quantizer.nsamples="
            f"{qcfg['nsamples']} and quantizer.seqlen={qcfg['seqlen']}"
        )
    solve_keys = ("groupsize", "blocksize", "percdamp", "act_order", "static_groups", "sym", "scale_search")
    knobs = _Solver({k: qcfg[k] for k in solve_keys}, cpu_solve_dtype, solve)
    quantize_block = _sequential_block if qcfg["true_sequential"] else _all_at_once_block
    embed = model.model.embed_tokens
    device, dtype = embed.weight.device, embed.weight.dtype
    seqlen = calib_ids.shape[1]
    chunk = max(1, _CHUNK_TOKENS // seqlen)
    t0 = time.perf_counter()
    with torch.no_grad():
        x = model.embed(calib_ids.to(device))  # [S, T, C]
        # per layer type: cos, sin [1, 1, T, D] and mask [1, 1, T, T] or None, broadcast over S
        inputs = model.layer_inputs(torch.arange(seqlen, device=device)[None], dtype)
        layers = model.model.layers
        for i, block in enumerate(tqdm(layers, desc="gptq", unit="block", disable=not progress)):
            results: dict[str, GPTQResult] = {}
            cos, sin, mask = inputs[block.layer_type]
            w = token_weights(block, x, cos, sin, qcfg["sink_weight"], qcfg["attention_weight"], mask)
            sqrt_w = None if w is None else w.sqrt()
            x = quantize_block(block, i, x, cos, sin, mask, chunk, knobs, results, sqrt_w)
            for name, res in results.items():
                linear = block.get_submodule(name)
                qlinear = Int4WeightOnlyLinear.from_quantized(
                    res.q, res.scales, res.zeros, res.g_idx, linear.in_features, linear.bias
                )
                block.set_submodule(name, qlinear)
    log.info("GPTQ: %d blocks in %.1f s", len(layers), time.perf_counter() - t0)
    return model


# How the calibration windows are drawn (runner/calibration.py).
SAMPLING = ("corpus", "document")


def _quantize(model: nn.Module, spec: dict, calib: torch.Tensor | None) -> None:
    gptq_quantize_model(model, calib, spec)


def _shell(linear: nn.Linear, spec: dict) -> nn.Module:
    # g_idx is stored exactly when act_order forms groups along the permuted order.
    return int4_shell(linear, spec, has_g_idx=spec["act_order"] and not spec["static_groups"])


GPTQ = Quantizer(
    name="gptq",
    knobs={
        "groupsize": positive_even_int,
        "sym": boolean,
        "blocksize": positive_int,
        "percdamp": number_at_least_zero("the reference uses 0.01"),
        "act_order": boolean,
        "static_groups": boolean,
        "true_sequential": boolean,
        "nsamples": positive_int,
        "seqlen": positive_int,
        "calibration": any_value,
        "sampling": one_of(*SAMPLING),
        "seed": non_negative_int,
        "sink_weight": positive_number("1 = the paper's GPTQ"),
        "attention_weight": boolean,
        "scale_search": boolean,
        "quantize_head": one_of(*HEAD_CHOICES),
    },
    quantize=_quantize,
    shell=_shell,
    needs_calibration=True,
    # quantizer.json written before these keys existed: what the code did then
    backfill={
        "sampling": "corpus",
        "sink_weight": 1,
        "attention_weight": False,
        "scale_search": False,
        "quantize_head": "none",
    },
)
