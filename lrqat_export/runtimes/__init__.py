"""Layer 4 (docs/ARCHITECTURE.md): running a model to score it — torch (`torch_eval`), real llama.cpp on a GGUF
(`llamacpp`) and a GPTQ directory through transformers + GPTQModel (`gptq_loader`)."""
