"""Layer 3 (docs/ARCHITECTURE.md): the training loop (`loop`), its config (`config`), resumable checkpoint state
(`state`), a method's whole prepare → train → fuse job (`job`) and FSDP2 under torchrun (`dist`, `fsdp`, `dcp`,
`memory`)."""
