"""Entry point kept at its historical path: `lrqat` (pyproject) and `python -m lrqat_export.cli` (torchrun)."""
import sys

from .app.cli import main

if __name__ == "__main__":
    sys.exit(main())
