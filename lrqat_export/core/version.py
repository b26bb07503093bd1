"""The tool's version, written into every artefact's provenance (IntCheckpoint manifest, GGUF, GPTQ config)."""
__version__ = "0.1.0"
