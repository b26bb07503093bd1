"""Text files → token ids → fixed-length windows.

Windows are non-overlapping slices of one token stream (no BOS inserted; every position after the first is a
next-token target). The embedded default corpus is CPython's own help text (`pydoc_data.topics`, ~0.7 MB of
English that ships with every Python installation), so the default pipeline works offline. Other text comes in
as file paths (tests and benchmarks pass WikiText-2's location in; the library reads no path of its own).
"""
from __future__ import annotations

import inspect
import logging
from pathlib import Path

import torch

from .errors import UserError
from .fsio import missing_file
from .models import eval_mode

log = logging.getLogger(__name__)

DEFAULT_CORPUS = "pydoc"  # the name accepted wherever a text file is expected


def embedded_corpus() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def read_texts(paths: list[str] | tuple[str, ...]) -> str:
    parts = []
    for p in paths:
        if p == DEFAULT_CORPUS:
            parts.append(embedded_corpus())
            continue
        path = Path(p)
        if not path.is_file():
            raise UserError(f"data file {p}: {missing_file(path)}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"data file {p}: expected UTF-8 text, got undecodable bytes ({e})") from None
        if not text.strip():
            raise UserError(f"data file {p}: expected text, got an empty file")
        parts.append(text)
    if not parts:
        raise UserError("data: expected at least one text file, got none")
    return "\n\n".join(parts)


def split_corpus(text: str, eval_fraction: float = 0.1) -> tuple[str, str]:
    """Train/eval split of one text by characters (the tail is held out), cut at a line break."""
    cut = int(len(text) * (1 - eval_fraction))
    nl = text.rfind("\n", 0, cut)
    cut = nl if nl > 0 else cut
    return text[:cut], text[cut:]


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """1-D LongTensor of ids, no special tokens. Long texts are tokenized in line-aligned chunks (the tokenizer's
    pre-tokenizer splits at whitespace, so chunking at line breaks does not change the ids)."""
    ids: list[int] = []
    chunk = 200_000
    start = 0
    while start < len(text) and (max_tokens is None or len(ids) < max_tokens):
        end = min(len(text), start + chunk)
        if end < len(text):
            nl = text.rfind("\n", start, end)
            end = nl + 1 if nl > start else end
        ids.extend(tokenizer(text[start:end], add_special_tokens=False)["input_ids"])
        start = end
    t = torch.tensor(ids, dtype=torch.long)
    return t if max_tokens is None else t[:max_tokens]


def check_windows(seq_len: int, max_windows: int | None, what: str = "data") -> None:
    """A window length of at least 2 (a window predicts each token from the ones before it), and at least one
    window when the number is capped."""
    if not isinstance(seq_len, int) or seq_len < 2:
        raise UserError(f"{what}: window length expected an integer >= 2, got {seq_len!r}")
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
        raise UserError(f"{what}: number of windows expected an integer >= 1, got {max_windows!r}")


def windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None, what: str = "data") -> torch.Tensor:
    """(N, seq_len) non-overlapping windows; the remainder is dropped."""
    check_windows(seq_len, max_windows, what)
    n = ids.numel() // seq_len
    if n == 0:
        raise UserError(f"{what}: expected at least one window of {seq_len} tokens, got {ids.numel()} tokens")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seq_len].reshape(n, seq_len)


def text_windows(tokenizer, paths, seq_len: int, max_windows: int | None = None, what: str = "data") -> torch.Tensor:
    check_windows(seq_len, max_windows, what)
    text = read_texts(paths)
    max_tokens = None if max_windows is None else (max_windows + 1) * seq_len
    return windows(tokenize(tokenizer, text, max_tokens), seq_len, max_windows, what)


@torch.no_grad()
def sampled_windows(model, prompts: torch.Tensor, seq_len: int, seed: int = 0, batch_size: int = 8,
                    temperature: float = 1.0) -> torch.Tensor:
    """(N, seq_len) windows the float `model` writes itself: each row of `prompts` (N, P) continued by sampling
    from the model's full distribution (temperature `temperature`, no top-k/top-p) up to seq_len tokens (an EOS
    is an ordinary token). Text from the model's own distribution (LLM-QAT's data-free QAT, Liu et al. 2023)
    lets a distilled student match the model beyond one domain's text. Deterministic for (model, prompts, seed),
    whatever the batch_size."""
    n, p = prompts.shape
    check_windows(seq_len, n, "sampled windows")
    if not 1 <= p < seq_len:
        raise UserError(f"sampled windows: prompt length expected 1..{seq_len - 1}, got {p}")
    if not temperature > 0:
        raise UserError(f"sampled windows: temperature expected > 0, got {temperature}")
    device = next(model.parameters()).device
    # one generator per window, each seeded by a draw from `seed` (torch's CPU generator keeps 32 bits of a seed):
    # the samples do not depend on batch_size
    row_seeds = torch.randint(0, 2 ** 31, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    gens = [torch.Generator(device="cpu").manual_seed(s) for s in row_seeds]
    # the key-value cache's keyword: "cache" from transformers 5.3x, "past_key_values" before
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = []
    with eval_mode(model):
        for k in range(0, n, batch_size):
            ids = prompts[k:k + batch_size].to(device)
            res, rows = model(input_ids=ids, use_cache=True), [ids]
            for _ in range(seq_len - p):
                probs = torch.softmax(res.logits[:, -1].float().cpu() / temperature, -1)
                nxt = torch.cat([torch.multinomial(q, 1, generator=g)
                                 for q, g in zip(probs, gens[k:k + batch_size])])[:, None].to(device)
                rows.append(nxt)
                res = model(input_ids=nxt, use_cache=True, **{key: getattr(res, key)})
            out.append(torch.cat(rows, 1).cpu())
    return torch.cat(out)
