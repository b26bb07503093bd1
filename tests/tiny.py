"""Tiny real models for tests: a byte-level BPE tokenizer trained on the embedded corpus and randomly
initialised Llama / Mistral / Qwen2 models saved as ordinary Hugging Face directories (safetensors)."""
from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 384
# WikiText-2 beside the checkout (../shared, which CI has too); the library reads no such path itself.
WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"


def wikitext(split: str) -> Path | None:
    """../shared/data/wikitext-2/{split}.txt, or None where it is absent."""
    p = WIKITEXT / f"{split}.txt"
    return p if p.is_file() else None


def make_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lrqat_export.core.data import embedded_corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([embedded_corpus()[:300_000]], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(out)
    return fast


def make_model(out: Path, arch: str = "llama", tie: bool = True, seed: int = 0, hidden: int = 64,
               layers: int = 2, heads: int = 4, kv_heads: int = 2, intermediate: int = 128) -> Path:
    """Save a random tiny model of `arch` (llama | mistral | qwen2) with a real tokenizer to `out`."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out)
    cls_cfg, cls_model = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
                          "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    cfg = cls_cfg(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                  tie_word_embeddings=tie, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    model = cls_model(cfg)
    with torch.no_grad():  # larger-than-default weights so quantization error is visible in tests
        for n, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in n:
                p.normal_(0, 0.08)
    model.save_pretrained(out)
    return out
