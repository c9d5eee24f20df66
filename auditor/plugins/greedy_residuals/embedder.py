"""Greedy Residuals embedder plugin (being written)."""
