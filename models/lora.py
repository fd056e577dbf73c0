"""LoRA: low-rank adapters on chosen Linear layers (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

`apply_lora(model, rank, alpha, dropout, target_modules)` replaces every `nn.Linear` whose attribute name is in
`target_modules` (e.g. q_proj, v_proj) by a `LoRALinear` and freezes everything else, so only the adapters train.
A `LoRALinear` keeps the base layer's `weight`/`bias` under the same names, so the base state-dict keys do not
change; the adapter adds `<layer>.lora_A.weight` [r, in] and `<layer>.lora_B.weight` [out, r] (PEFT's names).

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T

B starts at zero, so a freshly adapted model computes exactly the base model. `merge_lora` folds the adapters back
into plain `nn.Linear` layers (W + alpha/r * B A); `adapter_state_dict` / `save_adapter` give the adapter alone,
`load_adapter` puts a saved one back on a base model, and `save_peft` writes it as PEFT writes a LoRA adapter.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.weight = base.weight  # [out, in], frozen
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        out_features, in_features = base.weight.shape
        kw = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(in_features, rank, **kw)
        self.lora_B = nn.Linear(rank, out_features, **kw)
        # A as nn.Linear's default init (kaiming-uniform), B zero: the update B A starts at exactly zero (paper, 4.1).
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout)
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain Linear computing the same function (in eval mode): W + alpha/r * B A."""
        out_features, in_features = self.weight.shape
        layer = nn.Linear(in_features, out_features, bias=self.bias is not None, device="meta")
        # Compute the update in fp32 so a bf16 model does not lose the small adapter delta twice.
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling  # [out, in]
        layer.weight = nn.Parameter((self.weight.float() + delta).to(self.weight.dtype).detach())
        if self.bias is not None:
            layer.bias = nn.Parameter(self.bias.detach().clone())
        return layer


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float, target_modules: list[str]) -> list[str]:
    """Freeze `model` and wrap each Linear named in `target_modules` with a LoRALinear. Returns the wrapped names."""
    for p in model.parameters():
        p.requires_grad_(False)
    wanted = set(target_modules)
    replaced, seen = [], set()
    # Snapshot first: replacing while iterating named_modules() would visit the new adapters.
    for name, module in list(model.named_modules()):
        leaf = name.rpartition(".")[2]
        if leaf in wanted and isinstance(module, nn.Linear):
            parent = model.get_submodule(name.rpartition(".")[0])
            setattr(parent, leaf, LoRALinear(module, rank, alpha, dropout))
            replaced.append(name)
            seen.add(leaf)
    missing = sorted(wanted - seen)
    if missing:
        linear = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"LoRA target_modules {missing} match no Linear layer; valid names: {linear}")
    return replaced


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear in `model` by its merged plain Linear (in place; returns `model`)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent_name), leaf, module.merged())
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights alone (`<layer>.lora_A.weight`, `<layer>.lora_B.weight`), keyed as in model.state_dict()."""
    sd = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            sd[f"{name}.lora_A.weight"] = module.lora_A.weight.detach()
            sd[f"{name}.lora_B.weight"] = module.lora_B.weight.detach()
    return sd


def save_adapter(directory: str | Path, model: nn.Module, config: dict) -> Path:
    """Write the adapter alone: adapter_model.safetensors and adapter_config.json (`config`: rank, alpha, ...)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state_dict(model), str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    (d / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return d


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Put the adapter `save_adapter` wrote in `directory` on `model` (the base it was trained on), in place.
    ValueError naming the file when it is not such an adapter or does not fit the model."""
    d = Path(directory)
    cfg_path, weights = d / "adapter_config.json", d / "adapter_model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise ValueError(f"{d}: not a LoRA adapter (no adapter_config.json and adapter_model.safetensors there)")
    cfg = json.loads(cfg_path.read_text())
    try:
        apply_lora(model, cfg["rank"], cfg["alpha"], cfg["dropout"], list(cfg["target_modules"]))
        sd = load_file(str(weights))
    except (KeyError, SafetensorError) as e:
        raise ValueError(f"{d}: unreadable LoRA adapter ({e!r}); re-run the finetune or point at its adapter/") from e
    own = adapter_state_dict(model)
    if sd.keys() != own.keys() or any(sd[k].shape != own[k].shape for k in own):
        bad = sorted(k for k in own.keys() | sd.keys() if k not in sd or k not in own or sd[k].shape != own[k].shape)[0]
        raise ValueError(
            f"{weights}: tensor {bad!r} does not fit this base model; load the base the adapter was trained on"
        )
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            with torch.no_grad():
                module.lora_A.weight.copy_(sd[f"{name}.lora_A.weight"])
                module.lora_B.weight.copy_(sd[f"{name}.lora_B.weight"])
    return model


def save_peft(directory: str | Path, model: nn.Module, base_model: str | None) -> Path:
    """Write the adapter as PEFT writes a LoRA adapter, so `peft.PeftModel.from_pretrained(hf_base, directory)`
    loads it: adapter_model.safetensors with PEFT's keys (`base_model.model.<layer>.lora_A.weight`) and
    adapter_config.json (peft_type, task_type, r, lora_alpha, target_modules, ...; PEFT's LoraConfig names).
    `base_model` goes into base_model_name_or_path."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not layers:
        raise ValueError("the model has no LoRA adapters to write")
    first = next(iter(layers.values()))
    rank = first.lora_A.weight.shape[0]
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": first.scaling * rank,
        "lora_dropout": first.dropout.p,
        "target_modules": sorted({name.rpartition(".")[2] for name in layers}),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
    }
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    sd = {f"base_model.model.{k}": v.contiguous() for k, v in adapter_state_dict(model).items()}
    save_file(sd, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    (d / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return d
