"""Built-in detectors, restorers, embedders and attacks: one module each."""
