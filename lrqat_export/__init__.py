"""lrqat-export: LR-QAT training fused to exact integers, exported to GGUF and GPTQ."""
__version__ = "0.1.0"
