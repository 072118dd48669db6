"""The op core: argument checks, the custom ops and their backends, the functional and module
losses, the fused LM-head loss and the float64 reference. docs/DESIGN.md maps the files."""
