"""models/lora.py: zero-B adapters leave the model unchanged, only adapters train, merging is exact."""

import pytest
import torch
from conftest import tiny_model

from models.llama import Transformer
from models.lora import LoRALinear, adapter_state_dict, apply_lora, merge_lora

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _tiny() -> Transformer:
    return tiny_model(tie_word_embeddings=False)


def test_zero_b_gives_base_logits_and_only_adapters_train():
    model = _tiny()
    x = torch.randint(0, 259, (2, 16))
    base = model(x)
    base_params = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = apply_lora(model, rank=4, alpha=8, dropout=0.1, target_modules=TARGETS)
    assert len(wrapped) == 2 * len(TARGETS)
    model.eval()
    torch.testing.assert_close(model(x), base, rtol=0, atol=0)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_state_dict(model))
    assert all(n.endswith(("lora_A.weight", "lora_B.weight")) for n in trainable)

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(x).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    for k, v in base_params.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0)  # base weights untouched (same keys, too)
    assert any(after[k].abs().sum() > 0 for k in trainable if k.endswith("lora_B.weight"))


def test_merge_equals_base_plus_adapter():
    model = _tiny()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, rank=4, alpha=16, dropout=0.0, target_modules=TARGETS)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B.weight, std=0.02)
    model.eval()
    x = torch.randint(0, 259, (2, 16))
    with torch.no_grad():
        adapted = model(x)
    adapter = adapter_state_dict(model)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    merged = model.state_dict()
    assert set(merged) == set(base)
    for k, w in base.items():
        layer = k.removesuffix(".weight")
        if f"{layer}.lora_A.weight" in adapter:
            delta = adapter[f"{layer}.lora_B.weight"] @ adapter[f"{layer}.lora_A.weight"] * (16 / 4)
            torch.testing.assert_close(merged[k], w + delta)
            assert delta.abs().max() > 1e-4
        else:
            torch.testing.assert_close(merged[k], w, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)


def test_unknown_target_names_the_valid_ones():
    with pytest.raises(ValueError, match="qproj.*valid names.*q_proj"):
        apply_lora(_tiny(), rank=4, alpha=8, dropout=0.0, target_modules=["qproj"])
