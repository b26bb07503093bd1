"""Tiny real models for tests: a byte-level BPE tokenizer trained on the embedded corpus and randomly
initialised models of every supported family (Llama, Llama 3.x, Mistral, Qwen2, Qwen3, Gemma 3, Phi-3) saved as
ordinary Hugging Face directories (safetensors), built with transformers' own config classes."""
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


CHATML = {"specials": ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), "unk": "<|endoftext|>",
          "bos": "<|im_start|>", "eos": "<|im_end|>", "pad": "<|endoftext|>"}
# Phi-3's special tokens: llama.cpp sets token attributes by name on any model whose general.name says "phi3"
# and fails to load one whose vocab lacks them (llama-vocab.cpp, "unordered_map::at")
PHI3_SPECIALS = {"specials": ("<unk>", "<s>", "</s>", "<|endoftext|>"), "unk": "<unk>", "bos": "<s>",
                 "eos": "<|endoftext|>", "pad": "<|endoftext|>"}


def make_tokenizer(out: Path, pre: str = "gpt2", special: dict = CHATML):
    """pre: "gpt2" (ByteLevel's own regex) or a llama.cpp pre-tokenizer name of converters.gguf_meta.SPLIT_REGEX
    ("llama-bpe", "qwen2": that Split regex, then ByteLevel without its own regex)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from converters.gguf_meta import SPLIT_REGEX
    from lrqat_export.core.data import embedded_corpus

    tok = Tokenizer(models.BPE())
    if pre == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_REGEX[pre]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=list(special["specials"]),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([embedded_corpus()[:300_000]], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special["bos"], eos_token=special["eos"],
                                   unk_token=special["unk"], pad_token=special["pad"])
    fast.save_pretrained(out)
    return fast


# family → (transformers config and model classes, config fields beyond the common ones, tokenizer options).
# Shapes follow the real models' ratios: GQA everywhere, Qwen3's head_dim · heads ≠ hidden, Gemma 3's single KV
# head, six layers (five sliding-window, one global) and query_pre_attn_scalar = head_dim, Phi-4-mini's partial
# rotary factor and LongRoPE factors, Llama 3.x's llama3 rope scaling — with its original context shrunk from 8192
# to 32 (and Phi-3's short factors made large) so that the scaling changes the logits within a test's 128 tokens.
FAMILIES: dict[str, tuple[str, str, dict, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}, {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, {}),
    "llama3": ("LlamaConfig", "LlamaForCausalLM", {
        "max_position_embeddings": 1024,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32, "rope_theta": 500000.0}}, {"pre": "llama-bpe"}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32, "rope_theta": 1000000.0}, {"pre": "qwen2"}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {
        "head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 16, "rms_norm_eps": 1e-6}, {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {
        "max_position_embeddings": 2048, "original_max_position_embeddings": 512, "sliding_window": None,
        "rope_scaling": {"rope_type": "longrope", "partial_rotary_factor": 0.75, "rope_theta": 10000.0,
                         "short_factor": [1.0, 2.0, 4.0, 8.0, 16.0, 32.0],
                         "long_factor": [1.0, 3.0, 9.0, 27.0, 81.0, 243.0]}}, {"special": PHI3_SPECIALS}),
}


def make_model(out: Path, arch: str = "llama", tie: bool = True, seed: int = 0, hidden: int = 64,
               layers: int | None = None, heads: int = 4, kv_heads: int | None = None,
               intermediate: int = 128) -> Path:
    """Save a random tiny model of family `arch` (a key of FAMILIES) with a real tokenizer to `out`.
    layers / kv_heads None: the family's default (2 layers, Gemma 3 six; 2 KV heads, Gemma 3 one)."""
    import transformers

    cfg_name, model_name, extra, tok_options = FAMILIES[arch]
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out, **tok_options)
    layers = layers or (6 if arch == "gemma3" else 2)
    kv_heads = kv_heads or (1 if arch == "gemma3" else 2)
    kw = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
              tie_word_embeddings=tie, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id, rms_norm_eps=1e-5)
    cfg = getattr(transformers, cfg_name)(**{**kw, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg)
    newer = arch in ("llama3", "qwen3", "gemma3", "phi3")
    with torch.no_grad():  # larger-than-default weights so quantization error is visible in tests
        for n, p in model.named_parameters():
            if newer and (n == "lm_head.weight" or "embed" in n):
                p.normal_(0, 0.1)  # logits spread like a trained model's, so greedy argmaxes are not near-ties
            elif p.dim() == 2 and "embed" not in n:
                p.normal_(0, 0.08)
            elif p.dim() == 1 and "norm" in n and newer:
                p.add_(torch.randn_like(p), alpha=0.1)  # norms away from their init: a wrong offset shows
    model.save_pretrained(out)
    return out
