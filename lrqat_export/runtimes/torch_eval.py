"""Perplexity on token windows, in torch.

Two scoring protocols over the same (N, T) windows:
* "full": every next-token prediction of every window (T − 1 per window) — the GPTQ/LR-QAT papers' style;
* "second_half": only predictions of tokens first+1 .. T−1 with first = T/2 — llama.cpp `llama-perplexity`'s
  protocol (its numbers are what the llama.cpp community publishes).
PPL = exp(mean NLL) with NLL summed in float64.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PROTOCOLS = ("full", "second_half")


def first_scored(seq_len: int, protocol: str) -> int:
    """Index of the first logit row that is scored (row i predicts token i+1)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: expected one of {PROTOCOLS}, got {protocol!r}")
    return 0 if protocol == "full" else seq_len // 2


def nll_from_logits(logits: torch.Tensor, ids: torch.Tensor, protocol: str = "full") -> tuple[float, int]:
    """Summed NLL and count for one window: logits (T, V) where row i predicts ids[i+1]."""
    first = first_scored(ids.numel(), protocol)
    lp = F.log_softmax(logits[first:-1].double(), dim=-1)
    tgt = ids[first + 1:]
    return float(-lp.gather(1, tgt[:, None]).sum()), int(tgt.numel())


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor, protocol: str = "full", batch_size: int = 1, progress: bool = False,
               desc: str = "ppl (torch)") -> dict:
    """{'ppl', 'nll_sum', 'tokens', 'per_window_nll'} for a torch causal LM."""
    model.eval()
    total, count, per_window = 0.0, 0, []
    it = range(0, windows.shape[0], batch_size)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=desc, unit="window" if batch_size == 1 else "batch", leave=False)
    for i in it:
        batch = windows[i: i + batch_size].to(model.device)
        logits = model(input_ids=batch).logits.float()
        for row, ids in zip(logits, batch):
            nll, n = nll_from_logits(row, ids, protocol)
            total += nll
            count += n
            per_window.append(nll / n)
    return {"ppl": math.exp(total / count), "nll_sum": total, "tokens": count, "per_window_nll": per_window}
