"""models/generate.py (greedy parity with transformers, KV cache vs recompute, batching, sampling) and the
runner/generate.py stage (files, metrics, quantized checkpoints, CLI)."""

import json

import pytest
import torch
from conftest import make_tiny_hf, run_cli, run_in_process
from omegaconf import OmegaConf

from models.checkpoint import check_and_load, load_checkpoint, save_native
from models.generate import generate
from models.llama import Transformer
from quant import describe
from quant.checks import decoder_linears
from quant.int4 import Int4WeightOnlyLinear
from quant.int8 import Int8WeightOnlyLinear
from runner import common
from runner import generate as gen_stage
from runner.rundir import run_dir

VARIANTS = {
    "llama_gqa_tied": ("llama", dict(tie_word_embeddings=True)),
    "llama_mha_untied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "mistral": ("mistral", dict(sliding_window=None, tie_word_embeddings=False)),
    "qwen2": ("qwen2", dict(tie_word_embeddings=True)),
}


def _ours(path, kind="hf"):
    args, sd, tok, _ = load_checkpoint(kind, path)
    with torch.device("meta"):
        model = Transformer(args)
    check_and_load(model, sd, path)
    model.init_rope()
    return model.eval(), tok


def _greedy(model, tok, prompts, n, **kw):
    kw = dict(temperature=0.0, top_k=None, top_p=1.0, stop_ids=set(), stop_strings=[], generator=None) | kw
    return generate(model, tok, prompts, max_new_tokens=n, **kw)


def _hf_greedy(ref, prompt_ids, n):
    import transformers

    # No EOS: both sides produce exactly n tokens, so the comparison never depends on where EOS falls. (A None in
    # the passed config falls back to the model's own generation_config, so clear that too.)
    ref.generation_config.eos_token_id = None
    gc = transformers.GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt_ids]), generation_config=gc)
    return out[0, len(prompt_ids) :].tolist()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_equals_transformers(tmp_path, variant):
    import transformers

    kind, overrides = VARIANTS[variant]
    d = make_tiny_hf(tmp_path / "hf", kind, **overrides)
    ref = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    model, tok = _ours(d)
    prompt = tok.encode("Hello, world", bos=True)
    [r] = _greedy(model, tok, [prompt], 16)
    assert r["ids"] == _hf_greedy(ref, prompt, 16)
    assert r["finish_reason"] == "length" and r["completion_tokens"] == 16


def test_kv_cache_decode_equals_recompute(tiny_hf_dir):
    """Each cached decode step picks the argmax of a full forward over everything so far."""
    model, tok = _ours(tiny_hf_dir)
    prompt = tok.encode("KV cache check", bos=True)
    [r] = _greedy(model, tok, [prompt], 12)
    seq = torch.tensor([prompt + r["ids"]])  # [1, P + N]
    with torch.no_grad():
        full = model(seq)  # [1, P + N, V], no cache
    assert full[0, len(prompt) - 1 : -1].argmax(-1).tolist() == r["ids"]


def test_batch_of_unequal_prompts_equals_each_alone(tiny_hf_dir):
    model, tok = _ours(tiny_hf_dir)
    texts = ["a", "The quick brown fox jumps", "Left padding must not leak into"]
    prompts = [tok.encode(t, bos=True) for t in texts]
    batch = _greedy(model, tok, prompts, 10)
    for p, r in zip(prompts, batch, strict=True):
        assert r["ids"] == _greedy(model, tok, [p], 10)[0]["ids"]
        assert r["prompt_tokens"] == len(p)


def test_fixed_seed_reproduces_sampled_text(tiny_hf_dir):
    model, tok = _ours(tiny_hf_dir)
    prompts = [tok.encode("Once upon a time", bos=True), tok.encode("x", bos=True)]

    def sample(seed, **kw):
        kw = dict(temperature=1.0, top_k=None, top_p=1.0) | kw
        g = torch.Generator().manual_seed(seed)
        rs = generate(model, tok, prompts, max_new_tokens=12, stop_ids=set(), stop_strings=[], generator=g, **kw)
        return [r["ids"] for r in rs]

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    greedy = [r["ids"] for r in _greedy(model, tok, prompts, 12)]
    # A single candidate left, by either filter, is greedy decoding whatever the seed.
    assert sample(3, top_k=1) == greedy
    assert sample(4, top_p=1e-6, temperature=0.7) == greedy


def test_stop_id_and_stop_string(tiny_hf_dir):
    model, tok = _ours(tiny_hf_dir)
    prompt = tok.encode("stop here", bos=True)
    [free] = _greedy(model, tok, [prompt], 12)
    # A stop id ends the completion on its first occurrence; the id is kept in ids, not in text.
    third = free["ids"][2]
    [r] = _greedy(model, tok, [prompt], 12, stop_ids={third})
    first = free["ids"].index(third)
    assert r["ids"] == free["ids"][: first + 1] and r["finish_reason"] == "eos"
    assert r["text"] == tok.decode(free["ids"][:first])
    # A stop string is cut from the text, which streams without ever showing part of it.
    stop = free["text"][4:6]
    shown = []
    [r] = _greedy(model, tok, [prompt], 12, stop_strings=[stop], on_text=lambda row, text: shown.append(text))
    assert r["finish_reason"] == "stop"
    assert r["text"] == free["text"][: free["text"].index(stop)]
    assert all(r["text"].startswith(s) for s in shown) and shown[-1] == r["text"]


@pytest.mark.parametrize("bad", [[[]], []])
def test_sampler_rejects_empty_prompts(tiny_hf_dir, bad):
    model, tok = _ours(tiny_hf_dir)
    with pytest.raises(ValueError, match="at least one token"):
        _greedy(model, tok, bad, 4)


def test_native_checkpoint_generates_like_its_source(tmp_path, tiny_hf_dir, compose):
    """A native directory (what finetune and quantize write) loads through the stage and decodes the same tokens."""
    model, tok = _ours(tiny_hf_dir)
    save_native(tmp_path / "native", model, tok, None)
    cfg = compose(["task=generate", "debug=smoke", "checkpointer=native", f"checkpointer.path={tmp_path / 'native'}"])
    run_in_process(gen_stage, cfg)
    row = json.loads((run_dir() / "samples.jsonl").read_text())
    [ref] = _greedy(model, tok, [tok.encode(cfg.task.prompt)], cfg.task.max_new_tokens, stop_ids=tok.stop_ids)
    assert row["completion"] == ref["text"]


@pytest.mark.parametrize(
    ("overrides", "layer_type", "kernel"),
    [
        (["quantizer=int8_wo"], Int8WeightOnlyLinear, None),
        (["quantizer=int4_wo", "quantizer.groupsize=32"], Int4WeightOnlyLinear, "aten::_weight_int4pack_mm_for_cpu"),
    ],
)
def test_quantized_model_and_its_checkpoint_generate_alike(tmp_path, compose, overrides, layer_type, kernel):
    """Quantized at load time or reloaded from the native checkpoint quantize writes: the same tokens, and the
    linears stay quantized modules that run their integer kernel (the torchtune #1784/#1808 failure mode)."""
    base = ["task=generate", "debug=smoke", "model.dtype=bfloat16"]
    cfg = compose([*base, *overrides])
    model, tok = common.load_model(cfg)
    save_native(tmp_path / "q", model, tok, describe(OmegaConf.to_container(cfg.quantizer)))
    run_in_process(gen_stage, cfg)
    fresh = json.loads((run_dir() / "samples.jsonl").read_text())
    native = compose([*base, "checkpointer=native", f"checkpointer.path={tmp_path / 'q'}"], run_name="native")
    run_in_process(gen_stage, native)
    assert json.loads((run_dir() / "samples.jsonl").read_text()) == fresh
    loaded, tok = common.load_model(native)
    assert not decoder_linears(loaded)  # no float nn.Linear left in the blocks
    names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj")
    assert all(isinstance(b.get_submodule(n), layer_type) for b in loaded.model.layers for n in names)
    if kernel is not None:
        with torch.profiler.profile() as prof:
            _greedy(loaded, tok, [tok.encode("x")], 2)
        assert kernel in {e.key for e in prof.key_averages()}


def test_stage_end_to_end(compose, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"Hello"\n{"prompt": "A longer second prompt"}\n\n{"prompt": "3"}\n')
    cfg = compose(["task=generate", "debug=smoke", f"task.prompts_file={prompts}", "task.temperature=0.8"])
    metrics = run_in_process(gen_stage, cfg)
    for key in (
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
        "time_to_first_token_s",
        "peak_memory_bytes",
        "model_bytes",
        "bandwidth_gb_s",
    ):
        assert metrics[f"generate/{key}"] > 0, key
    # tiny ties its head to the embedding table, so a decode step reads every stored weight.
    assert metrics["generate/model_bytes"] == metrics["generate/decode_bytes_per_token"]
    rows = [json.loads(line) for line in (run_dir() / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["Hello", "A longer second prompt", "3"]
    for r in rows:
        assert 1 <= r["completion_tokens"] <= 8
        assert r["finish_reason"] in ("eos", "length", "stop")
    assert metrics["generate/new_tokens"] == sum(r["completion_tokens"] for r in rows)


def test_stage_chat(compose):
    cfg = compose(["task=generate", "debug=smoke", "task.chat=true", "task.system=Be brief."])
    run_in_process(gen_stage, cfg)
    row = json.loads((run_dir() / "samples.jsonl").read_text())
    assert row["prompt"] == cfg.task.prompt
    assert row["prompt_tokens"] > len("Be brief.") + len(cfg.task.prompt)  # the template was rendered around it


@pytest.mark.slow
def test_compiled_decode_equals_eager(tiny_hf_dir):
    """torch.compile of the decode step (tens of seconds of inductor work on CPU) changes no token."""
    model, tok = _ours(tiny_hf_dir)
    prompt = tok.encode("compile me", bos=True)
    [eager] = _greedy(model, tok, [prompt], 10)
    [compiled] = _greedy(model, tok, [prompt], 10, compile=True)
    assert compiled["ids"] == eager["ids"]
    assert compiled["timings"]["compile_s"] > 0 and eager["timings"]["compile_s"] == 0


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("task.top_p=1.5", "task.top_p"),
        ("task.top_p=0", "task.top_p"),
        ("task.max_new_tokens=0", "task.max_new_tokens"),
        ("task.prompt=''", "task.prompt"),
        ("task.max_new_tokens=1000", "task.max_new_tokens"),  # tiny's context is 256 tokens
        ("quantizer=gptq", "quantizer=gptq needs calibration"),  # only task=quantize builds calibration data
    ],
)
def test_bad_input_is_a_config_error(compose, override, key):
    with pytest.raises(common.ConfigError, match=key):
        run_in_process(gen_stage, compose(["task=generate", "debug=smoke", override]))


def test_a_prompts_file_that_is_not_utf8_is_named(compose, tmp_path):
    # issue 16: a bare UnicodeDecodeError, without the file name
    bad = tmp_path / "prompts.jsonl"
    bad.write_bytes(b'"caf\xe9"\n')  # latin-1
    with pytest.raises(common.ConfigError, match=rf"^{bad} \(task.prompts_file\): not UTF-8 text \(byte 0xe9"):
        run_in_process(gen_stage, compose(["task=generate", "debug=smoke", f"task.prompts_file={bad}"]))


def test_a_stop_string_is_passed_whole(compose, monkeypatch):
    # issue 16: task.stop="Question:" reached the decoder as its characters, stopping at the first Q, u, e, s ...
    seen = {}

    def spy(*args, **kwargs):
        seen["stop"] = kwargs["stop_strings"]
        return generate(*args, **kwargs)

    monkeypatch.setattr(gen_stage, "generate", spy)
    run_in_process(gen_stage, compose(["task=generate", "debug=smoke", "task.stop=Question:", "task.stream=false"]))
    assert seen["stop"] == ["Question:"]


def test_cli_bad_input_fails_with_one_line(tmp_path):
    run = tmp_path / "run"
    r = run_cli(["task=generate", "debug=smoke", "task.top_p=2.0", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "task.top_p=2.0" in errors[0] and "(0, 1]" in errors[0]
    assert "Traceback" not in r.stderr
    assert json.loads((run / "status.json").read_text())["status"] == "failed"


@pytest.mark.slow
def test_smollm2_greedy_equals_transformers(tmp_path, smollm2_gguf):
    import transformers

    from models.checkpoint import save_hf

    model, tok = _ours(smollm2_gguf, "gguf")
    save_hf(tmp_path / "hf", model, tok)  # the same dequantized weights, for the reference
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    prompt = tok.encode("The capital of France is")
    [r] = _greedy(model, tok, [prompt], 32)
    assert r["ids"] == _hf_greedy(ref, prompt, 32)
