"""hf and native checkpointers: round trips, sharding, and errors that name the file and the tensor."""

import json

import pytest
import torch
from conftest import make_tiny_hf

import models.checkpoint as ckpt
from models.checkpoint import check_and_load, load_checkpoint, save_hf, save_native
from models.llama import Transformer
from models.tokenizer import Tokenizer


def _build(args, sd, path):
    with torch.device("meta"):
        m = Transformer(args)
    check_and_load(m, sd, path)
    m.init_rope()
    return m.eval()


@pytest.fixture
def tiny(tiny_hf_dir):
    args, sd, tok, q = load_checkpoint("hf", tiny_hf_dir)
    return _build(args, sd, tiny_hf_dir), tok


def test_save_hf_loads_in_transformers(tmp_path, tiny):
    import transformers

    model, tok = tiny
    out = save_hf(tmp_path / "out", model, tok)
    ref = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.randint(0, 259, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(ref(x).logits, model(x), atol=1e-5, rtol=1e-5)
    assert Tokenizer.from_dir(out).encode("abc") == tok.encode("abc")


def test_sharded_hf_round_trip(tmp_path, tiny, monkeypatch):
    model, tok = tiny
    monkeypatch.setattr(ckpt, "MAX_SHARD_BYTES", 40_000)
    out = save_hf(tmp_path / "sharded", model, tok)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    args, sd, _, _ = load_checkpoint("hf", out)
    x = torch.randint(0, 259, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(_build(args, sd, out)(x), model(x))


def test_native_round_trip_has_sidecars(tmp_path, tiny):
    model, tok = tiny
    out = save_native(tmp_path / "native", model, tok, None, "seed: 0\n")
    assert {p.name for p in out.iterdir()} >= {
        "model.safetensors",
        "model_args.json",
        "quantizer.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "config.yaml",
    }
    args, sd, tok2, q = load_checkpoint("native", out)
    assert q == {"name": "none"} and args == model.args
    x = torch.randint(0, 259, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(_build(args, sd, out)(x), model(x))
    assert tok2.encode("hé") == tok.encode("hé")
    assert not (tmp_path / "native.tmp").exists()


def test_truncated_file_names_the_file(tmp_path, tiny):
    model, tok = tiny
    out = save_native(tmp_path / "n", model, tok, None)
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.safetensors"):
        load_checkpoint("native", out)


def test_missing_and_misshapen_tensors_are_named(tmp_path, tiny):
    model, _ = tiny
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    del sd["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        check_and_load(Transformer(model.args), sd, "ckpt-file")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["model.norm.weight"] = torch.ones(7)
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*\(7,\)"):
        check_and_load(Transformer(model.args), sd, "ckpt-file")


def test_missing_checkpoint_and_unknown_format(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_checkpoint("hf", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="valid: gguf, hf, native"):
        load_checkpoint("pickle", tmp_path)
    with pytest.raises(FileNotFoundError, match="model_args.json"):
        load_checkpoint("native", tmp_path)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_hf_config_round_trip(tmp_path, kind):
    d = make_tiny_hf(tmp_path / "a", kind)
    args, sd, tok, _ = load_checkpoint("hf", d)
    out = save_hf(tmp_path / "b", _build(args, sd, d), tok)
    assert load_checkpoint("hf", out)[0] == args


def test_wrong_checkpointer_names_the_right_one(tmp_path, tiny, tiny_hf_dir):
    """The defect: checkpointer=hf on a native directory said only "config.json: missing"."""
    native = save_native(tmp_path / "native", tiny[0], tiny[1], None, "seed: 0\n")
    with pytest.raises(ValueError, match="is a native checkpoint, not hf; load it with checkpointer=native"):
        load_checkpoint("hf", native)
    with pytest.raises(ValueError, match="is a hf checkpoint, not native; load it with checkpointer=hf"):
        load_checkpoint("native", tiny_hf_dir)
    gguf = tmp_path / "m.bin"
    gguf.write_bytes(b"GGUF" + b"\0" * 16)
    with pytest.raises(ValueError, match="load it with checkpointer=gguf"):
        load_checkpoint("hf", gguf)
