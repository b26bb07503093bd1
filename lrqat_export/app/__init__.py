"""Layer 5, the top (docs/ARCHITECTURE.md): the verbs as functions taking config objects (`jobs`, `verbs`, `run`,
`verify`, `inspect`), the report (`report`) and the argparse command line (`cli`), the only module that parses
arguments."""
