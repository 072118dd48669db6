"""Training on Hugging Face `transformers`: the DistillationTrainer, its config and YAML command line,
the span curriculum and the multi-process helpers."""
