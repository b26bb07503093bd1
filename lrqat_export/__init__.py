"""lrqat-export: LR-QAT training fused to exact integers, exported to GGUF and GPTQ.

The package is layered (docs/ARCHITECTURE.md): core → converters (top-level package) → methods → train →
runtimes → app. This root module only names the version; the command line is `lrqat_export.cli:main`.
"""
from .core.version import __version__

__all__ = ["__version__"]
