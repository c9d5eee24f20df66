"""pytorch loader (being written)."""
