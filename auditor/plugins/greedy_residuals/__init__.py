"""Greedy Residuals (ICML 2021): a signature carried by the signs of averaged top-|w| residuals.

Design notes: docs/design/greedy_residuals.md. :mod:`.scheme` holds the
math shared by the owner side and the detector.
"""
