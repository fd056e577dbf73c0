"""Paper-protocol perplexity, shared by task=quantize's quality check and task=eval's `wikitext2_ppl` task."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from models.llama import Transformer
from models.tokenizer import Tokenizer
from runner.common import ConfigError, data_path, read_text

WIKITEXT2_TEST = "wikitext2/wiki.test.raw"


def wikitext2_test_text(cfg: DictConfig) -> str:
    """WikiText-2 (raw) test split as the GPTQ paper scores it: rows joined with blank lines ("\\n\\n".join).

    The local file is rebuilt from the HF rows minus the blank ones (see shared/data/PROVENANCE.md), so each line
    gets back its trailing newline, as HF rows carry it; the dropped blank rows cannot be restored.
    """
    lines = read_text(data_path(cfg, WIKITEXT2_TEST)).splitlines()
    return "\n\n".join(line + "\n" for line in lines)


@torch.no_grad()
def perplexity(
    model: Transformer, tokenizer: Tokenizer, text: str, seqlen: int, max_windows: int | None, batch_size: int = 1
) -> tuple[float, int]:
    """exp(mean NLL) over non-overlapping `seqlen`-token windows of the whole text (GPTQ paper protocol).

    The text is tokenized once, without BOS; the tail that does not fill a window is dropped, as the reference does.
    Returns (perplexity, number of windows scored).
    """
    from tqdm import tqdm

    ids = torch.tensor(tokenizer.encode(text, bos=False), dtype=torch.long)
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise ConfigError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}; lower the seqlen")
    windows = ids[: n * seqlen].view(n, seqlen)  # [N, T]
    dev = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in tqdm(range(0, n, batch_size), desc="perplexity", leave=False):
        x = windows[i : i + batch_size].to(dev)
        logits = model(x).float()  # [B, T, V]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum"
        )
        nll += loss.item()
        count += x[:, 1:].numel()
    return float(torch.exp(torch.tensor(nll / count))), n
