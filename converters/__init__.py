"""Converters from an IntCheckpoint to deployment formats (one module per format)."""
