"""task=finetune: supervised finetuning (full or LoRA) in a plain PyTorch loop, on one device or sharded with FSDP2.

    python -m runner task=finetune data=alpaca
    python -m runner task=finetune data=lima task.method=lora task.optimizer.lr=2e-4
    torchrun --nproc_per_node=2 -m runner task=finetune hydra.run.dir=outputs/ft-ddp   # gloo on CPU, NCCL on GPU

Writes in the run directory (rank 0 only):
- metrics.jsonl: per step finetune/{loss, lr, grad_norm, tokens_per_s, peak_memory_gb}; finetune/val_loss at step 0,
  every task.eval_every steps and at the end.
- checkpoints/step_NNNNNN/: trainable.safetensors + train_state.pt (optimizer, scheduler, per-rank RNG, data
  position, last loss), written to a temporary directory and renamed; the newest task.keep_checkpoints are kept.
  Same format for any world size.
- model/: the final native checkpoint (`checkpointer=native checkpointer.path=<run>/model`); for LoRA also
  adapter/ (adapter_model.safetensors + adapter_config.json), and model/ only when task.lora.save_merged.
- export/<format>/ for each format of task.export (hf, peft, gguf; runner/exports.py with task=export's settings).

Knobs (conf/task/finetune.yaml; data in conf/data/, see runner/data.py):
- method: full | lora (lora.rank, alpha, dropout, target_modules: the usual r=8..64 trades size for capacity).
- batch_size is the global batch in sequences per optimizer step; micro_batch_size goes through one forward on one
  device. Gradient accumulation makes up the rest, so a run gives the same losses on 1 or N devices.
- optimizer, scheduler: hydra `_partial_` targets (AdamW; linear warmup then cosine decay).
- max_grad_norm (null: no clipping); bf16: auto (CUDA devices with bf16), true or false; activation_checkpointing
  recomputes each block in backward (less activation memory for about a third more compute); compile
  torch.compiles each block (slow first step, faster after).
- eval_every, save_every, keep_checkpoints; resume: true (this run directory's newest checkpoint, if any) or a
  path; stop_after: end this invocation after N steps with a checkpoint (job time limits), resume continues exactly.
A non-finite loss stops the run before the optimizer step, keeping the last good checkpoint. SIGINT, SIGTERM or
SIGHUP finishes the current step, writes a checkpoint and exits. A run directory that already holds checkpoints is
refused unless task.resume=true (continue) or task.overwrite=true (start over). LoRA dropout masks are drawn per
rank, so only dropout 0 gives world-size-independent losses.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import resource
import shutil
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from models.atomic import atomic_path, write_text_atomic
from models.checkpoint import save_native
from models.llama import Transformer
from models.lora import apply_lora, merge_lora, save_adapter
from models.tokenizer import Tokenizer
from runner import common, data, exports
from runner.knobs import check, integer, number, within_context
from runner.rundir import Interrupted, RunContext

log = logging.getLogger(__name__)
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors on rank 0, as on one device

# Every numeric knob's type and range, checked before anything loads (runner/knobs.py).
KNOBS = {
    "max_steps": integer(lo=1),
    "batch_size": integer(lo=1),
    "micro_batch_size": integer(lo=1),
    "max_seq_len": integer(lo=2),
    "optimizer.lr": number(gt=0),
    "optimizer.eps": number(gt=0),
    "optimizer.weight_decay": number(lo=0),
    "scheduler.warmup_steps": integer(lo=0),
    "scheduler.min_lr_ratio": number(lo=0, hi=1),
    "max_grad_norm": number(gt=0, null=True),
    "lora.rank": integer(lo=1),
    "lora.alpha": number(gt=0),
    "lora.dropout": number(lo=0, lt=1),
    "eval_every": integer(lo=1, null=True),
    "save_every": integer(lo=1, null=True),
    "keep_checkpoints": integer(lo=1),
    "stop_after": integer(lo=1, null=True),
}


def warmup_cosine(optimizer, max_steps: int, warmup_steps: int, min_lr_ratio: float) -> LambdaLR:
    """Linear warmup to the optimizer's lr over warmup_steps, then cosine decay to min_lr_ratio * lr at max_steps."""
    return LambdaLR(optimizer, functools.partial(_lr_factor, max_steps, warmup_steps, min_lr_ratio))


def _lr_factor(max_steps: int, warmup_steps: int, min_lr_ratio: float, step: int) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def run(cfg: DictConfig, ctx: RunContext) -> dict[str, float]:
    t = cfg.task
    if t.method not in ("full", "lora"):
        raise common.ConfigError(f"task.method={t.method!r} is unknown; use full or lora")
    if cfg.quantizer.name != "none":
        raise common.ConfigError("finetune trains float weights: use quantizer=none, then task=quantize on <run>/model")
    if t.bf16 not in (True, False, "auto"):
        raise common.ConfigError(f"task.bf16={t.bf16!r} is not valid; use auto, true or false")
    check(t, "task", KNOBS)
    check(cfg.data, "data", {"val_size": integer(lo=1)})
    _check_exports(t)
    if not isinstance(t.overwrite, bool):
        raise common.ConfigError(f"task.overwrite={t.overwrite!r} is not valid: use true or false")
    if t.resume is not True and t.resume is not False and not isinstance(t.resume, str):
        raise common.ConfigError(f"task.resume={t.resume!r} is not valid: use true, false or a checkpoint PATH")
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun
    dev = ctx.device
    if world > 1:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        if dev.type == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    try:
        return _train(cfg, ctx, world)
    finally:
        if world > 1:
            dist.destroy_process_group()


def _trainable_model(cfg: DictConfig) -> tuple[Transformer, Tokenizer]:
    """The float model in train mode, with LoRA adapters when task.method=lora."""
    t = cfg.task
    model, tok = common.load_model(cfg, apply_quantizer=False)
    torch.manual_seed(cfg.seed)  # LoRA init and dropout do not depend on how the weights were loaded
    if t.method == "lora":
        try:
            apply_lora(model, t.lora.rank, t.lora.alpha, t.lora.dropout, list(t.lora.target_modules))
        except ValueError as e:
            raise common.ConfigError(f"task.lora: {e}") from e
    return model.train(), tok


def _wrap_blocks(model: Transformer, activation_checkpointing: bool, compile_blocks: bool, world: int) -> None:
    """Activation checkpointing and torch.compile per decoder block, then FSDP2 sharding when world > 1."""
    for layer in model.model.layers:
        if activation_checkpointing:
            # Patching the instance's forward keeps state-dict keys and leaves FSDP's hooks outside the recompute.
            layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
        if compile_blocks:
            layer.compile()
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(next(model.parameters()).device.type, (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)


def _step_metrics(loss: float, lr: float, grad_norm: float, tokens_per_s: float, dev: torch.device) -> dict:
    return {
        "finetune/loss": loss,
        "finetune/lr": lr,
        "finetune/grad_norm": grad_norm,
        "finetune/tokens_per_s": tokens_per_s,
        "finetune/peak_memory_gb": _peak_memory_gb(dev),
    }


def _optimizer_step(params, optimizer, scheduler, max_grad_norm: float | None) -> tuple[float, float]:
    """Clip, step the optimizer and the schedule, clear the gradients; returns (grad norm, the lr just used)."""
    grad_norm = _clip_grads(params, max_grad_norm)
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr


def _run_directory(t: DictConfig, ctx: RunContext, world: int, rank: int) -> tuple[Path, Path | None]:
    """The run's directory and the checkpoint to resume from (None: a fresh run, which claims the directory)."""
    # Each rank of a torchrun job may get its own Hydra run directory (timestamps differ): rank 0's is the run's.
    out = Path(_broadcast(str(ctx.run_dir), world))
    resume = _resume_dir(t.resume, out)
    if resume is None or out.resolve() not in resume.resolve().parents:  # not continuing this directory's run
        _claim_run_dir(out, t.overwrite, rank)
    return out, resume


def _accumulate_gradients(model, batches, n_targets: float, dev, amp: bool, world: int) -> torch.Tensor:
    """Backward over this rank's micro-batches of one step; returns their summed loss (a 0-d tensor on dev)."""
    loss_sum = torch.zeros((), device=dev)
    for j, (x, y) in enumerate(batches):
        if world > 1:  # reduce-scatter gradients once per step, after the last micro-batch
            model.set_requires_gradient_sync(j == len(batches) - 1)
        nll = _summed_nll(model, x.to(dev), y.to(dev), amp)
        # Normalise by the global target count; x world because FSDP averages gradients over ranks.
        (nll * world / n_targets).backward()
        loss_sum += nll.detach()
    return loss_sum


def _start(resume, out: Path, model, optimizer, scheduler, rank: int, world: int) -> tuple[int, int, float]:
    """(step, sample position, last loss) to start from: 0, 0, NaN, or the resumed checkpoint's."""
    if resume is None:
        return 0, 0, math.nan
    step, position, loss = _load_checkpoint(resume, model, optimizer, scheduler, rank, world)
    if rank == 0:
        _drop_rows_after(out / "metrics.jsonl", step)  # logged after that checkpoint, before the interruption
    return step, position, loss


def _check_exports(t: DictConfig) -> list[str]:
    """task.export: formats written after training (runner/exports.py); peft needs LoRA, gptq a quantized model."""
    formats = exports.check_chain(t.export, "task.export")
    if "peft" in formats and t.method != "lora":
        raise common.ConfigError("task.export=[peft] writes a LoRA adapter: set task.method=lora, or drop peft")
    if "gptq" in formats:
        raise common.ConfigError("task.export=[gptq]: finetune writes a float model; task=quantize quantizer=gptq it")
    return formats


def _check_finite(loss: float, step: int, last_good: Path | None) -> None:
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"finetune: loss is {loss} at step {step}; stopped before the optimizer step. Last good "
            f"checkpoint: {last_good or 'none'}; lower task.optimizer.lr or set task.max_grad_norm"
        )


def _record_exports(ctx: RunContext, out: Path, rank: int) -> None:
    for kind in ("adapter", "model"):  # which of them _export wrote (LoRA: adapter, model if save_merged)
        if rank == 0 and (out / kind).is_dir():
            ctx.add_artifact(kind, out / kind)


def _train(cfg: DictConfig, ctx: RunContext, world: int) -> dict[str, float]:
    t = cfg.task
    rank = dist.get_rank() if world > 1 else 0
    if t.batch_size % (world * t.micro_batch_size):
        raise common.ConfigError(
            f"task.batch_size={t.batch_size} must divide by micro_batch_size={t.micro_batch_size} x {world} devices"
        )
    mb = t.micro_batch_size
    out, resume = _run_directory(t, ctx, world, rank)
    model, tok = _trainable_model(cfg)
    within_context({"task.max_seq_len": t.max_seq_len}, model.args.max_position_embeddings)
    dev = next(model.parameters()).device
    train, val = data.load_examples(cfg, tok)
    _wrap_blocks(model, t.activation_checkpointing, t.compile, world)
    params = [p for p in model.parameters() if p.requires_grad]
    # _convert_=all: plain lists in param_groups, so the optimizer state saves and loads with weights_only=True.
    optimizer = instantiate(t.optimizer, _convert_="all")(params)
    scheduler = instantiate(t.scheduler)(optimizer, max_steps=t.max_steps)
    amp = t.bf16 is True or (t.bf16 == "auto" and dev.type == "cuda" and torch.cuda.is_bf16_supported())

    step, position, loss = _start(resume, out, model, optimizer, scheduler, rank, world)
    end = t.max_steps if t.stop_after is None else min(t.max_steps, step + t.stop_after)
    sampler = data.Sampler(len(train), cfg.seed)
    evaluate = functools.partial(_val_loss, model, val, mb, tok.pad_id, dev, amp, rank, world)
    log_rank0 = ctx.log_metrics if rank == 0 else lambda metrics, step: None
    val_loss = None
    if step == 0:
        val_loss = evaluate()
        log_rank0({"finetune/val_loss": val_loss}, 0)

    tokens_seen, train_time, saved = 0, 0.0, None
    # The bar is closed on any exit, so an error line starts on a line of its own.
    bar = tqdm(total=t.max_steps, initial=step, desc="finetune", disable=rank != 0)
    with bar, _Interrupt() as interrupt:
        while step < end:
            t0 = time.perf_counter()
            idx = sampler.take(position, t.batch_size)
            batches, n_tokens = data.micro_batches(train, idx, mb, rank, world, tok.pad_id)  # this rank's share
            n_targets = sum((y != data.IGNORE_INDEX).sum().item() for _, y in batches)
            n_targets, n_tokens = _all_sum(torch.tensor([n_targets, n_tokens], dtype=torch.float64), world).tolist()
            loss_sum = _accumulate_gradients(model, batches, n_targets, dev, amp, world)
            flag = torch.tensor(float(interrupt.signal is not None))
            reduced = _all_sum(torch.stack([loss_sum.cpu(), flag]), world)
            loss = reduced[0].item() / n_targets
            _check_finite(loss, step + 1, saved or resume)
            grad_norm, lr = _optimizer_step(params, optimizer, scheduler, t.max_grad_norm)
            step, position = step + 1, position + t.batch_size
            dt = time.perf_counter() - t0
            tokens_seen, train_time = tokens_seen + n_tokens, train_time + dt
            metrics = _step_metrics(loss, lr, grad_norm, n_tokens / dt, dev)
            if step == end or (t.eval_every is not None and step % t.eval_every == 0):
                metrics["finetune/val_loss"] = val_loss = evaluate()
            log_rank0(metrics, step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{n_tokens / dt:.0f}")
            stopping = reduced[1].item() > 0
            if stopping or step == end or (t.save_every is not None and step % t.save_every == 0):
                state = {"step": step, "position": position, "loss": loss}
                saved = _save_checkpoint(out, state, model, optimizer, scheduler, rank, world, t.keep_checkpoints)
            if stopping:
                raise Interrupted(
                    interrupt.signal, f"stopped after step {step}; checkpoint {saved} (continue: task.resume=true)"
                )

    if val_loss is None:  # resumed with no steps left
        val_loss = evaluate()
    if step == t.max_steps:
        _export(cfg, ctx, out, model, tok, rank)
        _record_exports(ctx, out, rank)
    return {
        "finetune/final_loss": loss,
        "finetune/val_loss": val_loss,
        "finetune/tokens_per_s": tokens_seen / train_time if train_time else math.nan,
        "finetune/steps": float(step),
    }


def _summed_nll(model, x: torch.Tensor, y: torch.Tensor, amp: bool) -> torch.Tensor:
    """Summed next-token loss of inputs x [B, T] against targets y [B, T] (IGNORE_INDEX: no target)."""
    keep = y != data.IGNORE_INDEX  # [B, T]
    # The output head and its softmax are about a fifth of the compute at a 49k vocabulary, and prompt and padding
    # positions need neither: the model computes the logits at the target positions only, [N, V].
    with torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
        logits = model(x, logits_at=keep)  # [N, V]
    return F.cross_entropy(logits.float(), y[keep], reduction="sum")


@torch.no_grad()
def _val_loss(model, val, mb, pad_id, dev, amp, rank, world) -> float:
    """Mean next-token loss over the whole validation split (dropout off)."""
    model.eval()
    batches = [val[i : i + mb] for i in range(0, len(val), mb)]
    total = torch.zeros(2, dtype=torch.float64)  # [summed nll, targets]
    # Every rank runs the same number of forwards (FSDP gathers weights collectively); padding slots are not counted.
    for i in range(rank, -(-len(batches) // world) * world, world):
        x, y = data.collate(batches[i % len(batches)], pad_id)
        nll = _summed_nll(model, x.to(dev), y.to(dev), amp)
        if i < len(batches):
            total += torch.tensor([nll.item(), (y != data.IGNORE_INDEX).sum().item()], dtype=torch.float64)
    model.train()
    total = _all_sum(total, world)
    return (total[0] / total[1]).item()


def _clip_grads(params, max_norm: float | None) -> float:
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if isinstance(norm, DTensor):  # FSDP2: per-shard norms -> the global norm
        norm = norm.full_tensor()
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm.item()


def _save_checkpoint(out: Path, state: dict, model, optimizer, scheduler, rank, world, keep: int) -> Path:
    """Gather the training state to rank 0 and write it atomically, then keep the newest `keep` checkpoints up to
    this one (a newer step is never deleted); returns the checkpoint directory. `state`: step, position, loss."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    weights = get_model_state_dict(model, options=options)
    optim = get_optimizer_state_dict(model, optimizer, options=FULL)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    rngs = [rng]
    if world > 1:
        rngs = [None] * world
        dist.all_gather_object(rngs, rng)
    step = state["step"]
    final = out / "checkpoints" / f"step_{step:06d}"
    if rank == 0:
        with atomic_path(final, directory=True) as tmp:  # a rename: resume never sees a half-written checkpoint
            save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "trainable.safetensors"))
            state = {**state, "world_size": world, "optimizer": optim, "rng": rngs}
            torch.save({**state, "scheduler": scheduler.state_dict()}, tmp / "train_state.pt")
        older = sorted((s, p) for s, p in _checkpoints(final.parent) if s < step)
        for _, old in older[: max(0, len(older) - (keep - 1))]:
            shutil.rmtree(old)
        for leftover in final.parent.glob("step_*.tmp"):  # a crashed write's (the run-dir lock excludes live ones)
            shutil.rmtree(leftover, ignore_errors=True)
    if world > 1:
        dist.barrier()
    return final


def _resume_dir(resume, out: Path) -> Path | None:
    if resume is False:
        return None
    root = out if resume is True else Path(resume).expanduser()
    if (root / "train_state.pt").is_file():
        return root
    found = _checkpoints(root / "checkpoints")
    if not found:
        if resume is True:
            log.info("task.resume=true: no checkpoint in %s yet, starting from step 0", root)
            return None
        raise common.ConfigError(f"task.resume={resume}: no train_state.pt there or under its checkpoints/")
    return max(found)[1]


def _checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under `directory` (step_NNNNNN; atomic writes' temporaries skipped)."""
    if not directory.is_dir():
        return []
    return [(int(p.name[5:]), p) for p in directory.glob("step_*") if p.name[5:].isdigit() and p.is_dir()]


def _claim_run_dir(out: Path, overwrite: bool, rank: int) -> None:
    """A fresh run (no resume) in `out`: refuse when earlier training left checkpoints there, unless
    task.overwrite=true, which deletes them and the earlier run's step rows and final model."""
    found = sorted(_checkpoints(out / "checkpoints"))
    if not found:
        return
    if not overwrite:
        raise common.ConfigError(
            f"{out} already holds checkpoints up to {found[-1][1].name}; continue that run with task.resume=true, "
            "start over with task.overwrite=true (deletes them), or pick another hydra.run.dir"
        )
    if rank == 0:
        log.warning("task.overwrite=true: deleting %s's checkpoints, model and step rows", out)
        for name in ("checkpoints", "model", "adapter"):
            shutil.rmtree(out / name, ignore_errors=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)


def _drop_rows_after(path: Path, step: int) -> None:
    """Keep the metrics.jsonl rows up to `step` (the resumed checkpoint's): later ones are logged again."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if _row_step(line) <= step]
    if len(kept) != len(lines):
        write_text_atomic(path, "".join(kept))


def _row_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):  # a row cut by the kill (or a blank line): dropped
        return math.inf


def _load_checkpoint(ckpt: Path, model, optimizer, scheduler, rank, world) -> tuple[int, int, float]:
    weights = load_file(str(ckpt / "trainable.safetensors"))
    state = torch.load(ckpt / "train_state.pt", weights_only=True)  # tensors and plain containers only
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != trainable:
        raise common.ConfigError(f"{ckpt}: its trainable tensors differ from this run's (task.method or task.lora)")
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(state["scheduler"])
    if state["world_size"] == world:
        rng = state["rng"][rank]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    else:
        log.warning("resuming on %d ranks from %d: random streams (dropout) restart", world, state["world_size"])
    log.info("resumed from %s at step %d", ckpt, state["step"])
    # Checkpoints written before the loss was saved in them give NaN, as a resume with no steps left did then.
    return state["step"], state["position"], state.get("loss", math.nan)


def _export(cfg: DictConfig, ctx: RunContext, out: Path, model, tok, rank: int) -> None:
    """Write the final model as a plain (unsharded) native checkpoint, merging LoRA; for LoRA also the adapter; then
    the formats of task.export (runner/exports.py) under export/<format>/."""
    sd = get_model_state_dict(model, options=FULL)
    if rank != 0:
        return
    t = cfg.task
    with torch.device("meta"):
        final = Transformer(model.args)
    if t.method == "lora":
        apply_lora(final, t.lora.rank, t.lora.alpha, t.lora.dropout, list(t.lora.target_modules))
    final.load_state_dict(sd, assign=True)
    final.init_rope()
    formats = _check_exports(t)
    if t.method == "lora":
        base = {"checkpointer": cfg.checkpointer.name, "path": cfg.checkpointer.path, "source": cfg.model.source}
        save_adapter(out / "adapter", final, {**OmegaConf.to_container(t.lora, resolve=True), "base_model": base})
        exports.chain([f for f in formats if f == "peft"], ctx, final, tok, {"name": "none"}, cfg.model.name)
        merge_lora(final)
    if t.method != "lora" or t.lora.save_merged:
        save_native(out / "model", final, tok, None, common.resolved_yaml(cfg))
    exports.chain([f for f in formats if f != "peft"], ctx, final, tok, {"name": "none"}, cfg.model.name)


class _Interrupt:
    """SIGINT/SIGTERM/SIGHUP only set `signal`, which the loop checks after each step; a second signal stops at once."""

    def __enter__(self):
        self.signal = None
        signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        self._previous = {s: signal.signal(s, self._handle) for s in signals}
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise Interrupted(signum, "a second signal stopped it during a step; resume from the last checkpoint")
        self.signal = signum

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _broadcast(obj, world: int):
    box = [obj]
    if world > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_sum(x: torch.Tensor, world: int) -> torch.Tensor:
    """Sum a small CPU tensor over ranks (NCCL only reduces CUDA tensors)."""
    if world == 1:
        return x
    y = x.to("cuda" if dist.get_backend() == "nccl" else "cpu", copy=True)
    dist.all_reduce(y)
    return y.cpu()


def _peak_memory_gb(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
