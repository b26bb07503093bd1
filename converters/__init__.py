"""Layer 1, the format layer (docs/ARCHITECTURE.md): an IntCheckpoint into deployment formats, one module per format
(`gguf` with `gguf_meta`, `gptq`), each with its reader beside its writer, and `sniff`, which tells the artefacts
apart. Imports only lrqat_export.core (the grid and the IntCheckpoint format): no training, methods or app code."""
