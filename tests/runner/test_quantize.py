"""task=quantize end to end on the tiny model (debug=smoke), plus one real SmolLM2 run (slow)."""

import json
import math

import pytest
import torch
from conftest import make_tiny_hf, run_in_process
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from quant import quantize_model
from runner import common, quantize
from runner.calibration import calibration_windows
from runner.common import ConfigError
from runner.perplexity import WIKITEXT2_TEST
from runner.rundir import run_dir, run_stage

# Small GPTQ calibration so the tiny-model runs stay around a second each.
GPTQ_SMALL = ["quantizer.nsamples=4", "quantizer.seqlen=64"]
QUANTIZERS = {"int4_wo": ["quantizer.groupsize=32"], "int8_wo": [], "gptq": ["quantizer.groupsize=32", *GPTQ_SMALL]}
METRICS = {
    "quantize/seconds",
    "quantize/model_bytes",
    "quantize/float_bytes",
    "quantize/compression",
    "quantize/ppl",
    "quantize/ppl_float",
    "quantize/ppl_windows",
}


@pytest.fixture
def quantize_cfg(compose):
    # The session cache: the tiny model's float perplexity is then computed once per session, as in a sweep.
    def _cfg(*overrides, run_name="run"):
        return compose(["task=quantize", "debug=smoke", *overrides], run_name=run_name)

    return _cfg


def _logits(model, seed=0):
    ids = torch.randint(0, model.args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("name", QUANTIZERS)
def test_writes_a_native_checkpoint_that_reloads_to_the_same_logits(quantize_cfg, name):
    cfg = quantize_cfg(f"quantizer={name}", *QUANTIZERS[name])
    metrics = run_stage(cfg, quantize.run)  # as python -m runner runs it: metrics.jsonl is written by the wrapper
    assert set(metrics) == METRICS
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    assert metrics["quantize/compression"] > 1 and metrics["quantize/ppl_windows"] == cfg.task.ppl_windows

    out = run_dir() / "model"
    for f in ("model.safetensors", "model_args.json", "quantizer.json", "tokenizer.json", "config.yaml"):
        assert (out / f).is_file(), f
    saved = json.loads((out / "quantizer.json").read_text())
    assert saved["name"] == name and saved.get("groupsize") == cfg.quantizer.get("groupsize")
    assert json.loads((run_dir() / "metrics.jsonl").read_text()) == {"step": 0, **metrics}

    # The same quantization done by hand on the same float model is what the checkpoint must hold.
    model, tok = common.load_model(cfg, apply_quantizer=False)
    calib = calibration_windows(cfg, tok) if name == "gptq" else None
    expected = _logits(quantize_model(model, OmegaConf.to_container(cfg.quantizer, resolve=True), calib))

    reloaded, _ = common.load_model(quantize_cfg("checkpointer=native", f"checkpointer.path={out}", run_name="load"))
    torch.testing.assert_close(_logits(reloaded), expected, rtol=0, atol=0)


def test_same_seed_gives_bit_identical_checkpoint_files(quantize_cfg):
    overrides = ["quantizer=gptq", *GPTQ_SMALL, "task.ppl=false", "seed=3"]
    files = []
    for run in ("a", "b"):
        run_in_process(quantize, quantize_cfg(*overrides, run_name=run))
        out = run_dir() / "model"
        files.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert files[0].keys() == files[1].keys() and "model.safetensors" in files[0]
    for name in files[0]:
        assert files[0][name] == files[1][name], name

    run_in_process(quantize, quantize_cfg(*overrides[:-1], "seed=4", run_name="c"))
    assert (run_dir() / "model" / "model.safetensors").read_bytes() != files[0]["model.safetensors"]


def test_act_order_checkpoint_stores_g_idx_and_reloads(quantize_cfg):
    cfg = quantize_cfg(
        "quantizer=gptq", *GPTQ_SMALL, "quantizer.act_order=true", "quantizer.static_groups=false", "task.ppl=false"
    )
    run_in_process(quantize, cfg)
    out = run_dir() / "model"
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "model.layers.0.self_attn.q_proj.g_idx" in set(f.keys())
    reloaded, _ = common.load_model(quantize_cfg("checkpointer=native", f"checkpointer.path={out}", run_name="load"))
    assert torch.isfinite(_logits(reloaded)).all()


def test_float_perplexity_is_cached_across_jobs(compose, tmp_path):
    def quantize_cfg(*overrides, run_name="run"):
        return compose(["task=quantize", "debug=smoke", f"paths.cache_dir={tmp_path}", *overrides], run_name=run_name)

    first = run_in_process(quantize, quantize_cfg("quantizer=int8_wo", "task.save=false"))
    [entry] = (tmp_path / "ppl").glob("*.json")
    record = json.loads(entry.read_text())
    assert record["ppl"] == first["quantize/ppl_float"]
    # A second job of the sweep (another quantizer) reads the float model's number instead of recomputing it.
    entry.write_text(json.dumps({**record, "ppl": 12.5}))
    second = run_in_process(quantize, quantize_cfg("quantizer=int4_wo", "task.save=false", run_name="second"))
    assert second["quantize/ppl_float"] == 12.5
    # Other window settings are another entry.
    run_in_process(
        quantize, quantize_cfg("quantizer=int8_wo", "task.save=false", "task.ppl_windows=1", run_name="third")
    )
    assert len(list((tmp_path / "ppl").glob("*.json"))) == 2


def test_a_model_replaced_at_the_same_source_is_scored_again(compose, tmp_path):
    # issue 16: with model.sha256 null (every hf: model config) the cache key was source + sha256 alone, so a model
    # replaced at the same path got the old model's float perplexity (a quantized model reported 4.5x better).
    model_dir = make_tiny_hf(tmp_path / "model")
    over = ["task=quantize", "debug=smoke", "quantizer=int8_wo", "task.save=false", f"model.source={model_dir}"]
    over += ["model.format=hf", f"paths.cache_dir={tmp_path / 'cache'}"]
    first = run_in_process(quantize, compose(over))
    weights = load_file(model_dir / "model.safetensors")
    save_file(
        {k: v * 1.5 if k.endswith("proj.weight") else v for k, v in weights.items()}, model_dir / "model.safetensors"
    )
    second = run_in_process(quantize, compose(over, run_name="second"))
    assert second["quantize/ppl_float"] != first["quantize/ppl_float"]
    assert len(list((tmp_path / "cache" / "ppl").glob("*.json"))) == 2


@pytest.mark.parametrize("override", ["task.ppl_seqlen=512", "quantizer.seqlen=300"])
def test_windows_past_the_model_context_are_refused(quantize_cfg, override):
    key, _, value = override.partition("=")
    with pytest.raises(ConfigError, match=rf"^{key}={value} exceeds the model's context of 256 tokens"):
        run_in_process(quantize, quantize_cfg("quantizer=gptq", *GPTQ_SMALL, override))


def test_save_false_and_ppl_false_write_and_report_only_what_is_asked(quantize_cfg):
    metrics = run_in_process(quantize, quantize_cfg("quantizer=int4_wo", "task.save=false", "task.ppl=false"))
    assert set(metrics) == {"quantize/seconds", "quantize/model_bytes", "quantize/float_bytes", "quantize/compression"}
    assert not (run_dir() / "model").exists()


def test_quantizer_none_is_refused(quantize_cfg):
    with pytest.raises(ConfigError, match="quantizer=gptq"):
        run_in_process(quantize, quantize_cfg())


def test_zero_ppl_windows_is_refused(quantize_cfg):
    with pytest.raises(ConfigError, match="task.ppl_windows=0"):
        run_in_process(quantize, quantize_cfg("quantizer=int8_wo", "task.ppl_windows=0"))


def test_calibrating_on_the_scored_text_is_refused(quantize_cfg, data_dir):
    scored = data_dir / WIKITEXT2_TEST
    with pytest.raises(ConfigError, match="task.ppl"):
        run_in_process(quantize, quantize_cfg("quantizer=gptq", f"quantizer.calibration={scored}"))
    # Without the quality check there is nothing to leak into.
    quantize._check_inputs(quantize_cfg("quantizer=gptq", f"quantizer.calibration={scored}", "task.ppl=false"))


def test_missing_calibration_data_is_a_config_error_naming_the_file(quantize_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"c4/c4_demo\.jsonl"):
        run_in_process(quantize, quantize_cfg("quantizer=gptq", f"paths.data_dir={tmp_path / 'empty'}"))


def test_an_already_quantized_checkpoint_is_refused(quantize_cfg):
    run_in_process(quantize, quantize_cfg("quantizer=int8_wo", "task.ppl=false"))
    out = run_dir() / "model"
    with pytest.raises(ConfigError, match="already quantized"):
        run_in_process(
            quantize, quantize_cfg("quantizer=int4_wo", "checkpointer=native", f"checkpointer.path={out}", run_name="2")
        )


def test_quantized_checkpoint_runs_through_generate(quantize_cfg, compose):
    generate = pytest.importorskip("runner.generate")
    run_in_process(quantize, quantize_cfg("quantizer=gptq", *GPTQ_SMALL, "quantizer.groupsize=32", "task.ppl=false"))
    out = run_dir() / "model"
    metrics = run_in_process(
        generate,
        compose(["task=generate", "debug=smoke", "checkpointer=native", f"checkpointer.path={out}"], run_name="gen"),
    )
    assert metrics["generate/decode_tokens_per_s"] > 0


@pytest.mark.slow
def test_smollm2_gptq_main_job_keeps_perplexity_near_float(compose, tmp_path, smollm2_gguf):
    cfg = compose(
        [
            "task=quantize",
            f"paths.cache_dir={tmp_path / 'cache'}",
            "quantizer=gptq",
            "quantizer.nsamples=4",
            "quantizer.seqlen=512",
            "task.ppl_seqlen=2048",
            "task.ppl_windows=2",
            "task.save=false",
            "checkpointer=gguf",
            f"checkpointer.path={smollm2_gguf}",
        ]
    )
    m = run_in_process(quantize, cfg)
    assert math.isfinite(m["quantize/ppl"]) and 5 < m["quantize/ppl_float"] < 100
    # int4 group-128 GPTQ costs SmolLM2-135M a few percent to ~20% perplexity; 1.5x would mean a broken quantizer.
    assert m["quantize/ppl_float"] * 0.95 < m["quantize/ppl"] < 1.5 * m["quantize/ppl_float"]
    assert m["quantize/compression"] > 2.5
