"""Layer 2 (docs/ARCHITECTURE.md): the quantization methods. Each method — its layer, its trainable groups, its
defaults, its fuse into an IntCheckpoint and whether that export is exact — is defined once, in `registry`."""
