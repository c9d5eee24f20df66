"""Greedy Residuals detector plugin (being written)."""
