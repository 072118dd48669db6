"""Sparse teachers: the top-k loss (teacher logits stored as k ids and values per token), its float64
reference, and the on-disk teacher cache."""
