"""Layer 0, the base every other layer stands on (docs/ARCHITECTURE.md): the quantization grid (`quant`), the
IntCheckpoint format (`intckpt`), errors, atomic file IO (`fsio`), text data (`data`) and loading float models
(`models`). Imports nothing from the rest of the project."""
