"""Our int8_wo wrapper gives what torchao's `quantize_` gives when called directly on the same tiny model."""

from __future__ import annotations

import pytest
import torch
from quant_helpers import tiny_model, token_ids
from safetensors.torch import save_file
from torchao.quantization import Int8WeightOnlyConfig, quantize_

from quant import quantize_model
from quant.checks import decoder_linears


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_wo_wrapper_equals_torchao_quantize(dtype):
    direct = tiny_model().to(dtype)
    targets = set(decoder_linears(direct).values())
    quantize_(direct, Int8WeightOnlyConfig(), filter_fn=lambda module, fqn: module in targets)
    ours = quantize_model(tiny_model().to(dtype), {"name": "int8_wo"})

    for name in decoder_linears(tiny_model()):
        theirs, mine = direct.get_submodule(name).weight, ours.get_submodule(name)
        assert torch.equal(mine.qweight, theirs.qdata)
        assert torch.equal(mine.scales, theirs.scale.reshape(-1).float())
    ids = token_ids()
    with torch.no_grad():
        if dtype == torch.float32:
            assert torch.equal(ours(ids), direct(ids))
        else:  # bf16 on CPU runs aten's int8 kernel (fp32 accumulation), torchao a bf16 matmul: equal to bf16 rounding
            ref = direct.to(torch.float32)(ids)
            assert ((ours(ids).float() - ref).abs().max() / ref.abs().max()).item() < 2e-2


def test_torchao_weights_do_not_save_with_safetensors(tmp_path):
    """Why int8_wo keeps its own module: the day this passes, torchao's Int8Tensor could be stored directly."""
    direct = tiny_model()
    quantize_(direct, Int8WeightOnlyConfig(), filter_fn=lambda module, fqn: isinstance(module, torch.nn.Linear))
    with pytest.raises(RuntimeError):
        save_file(direct.state_dict(), tmp_path / "m.safetensors")
