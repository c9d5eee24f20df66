"""auditor: forensic auditing of watermarked deep-learning models.

Plugins write ``from auditor import hookimpl`` and subclass one of the base
classes re-exported here.
"""

from auditor.bases import Attack, Detector, Embedder, Format, Param, PluginComponent, Presentable, Restorer
from auditor.findings import Finding, Verdict
from auditor.graph import Edge, EdgeSource, Layer, LayerGraph, LayerKind, TensorRef
from auditor.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = [
    "Attack",
    "Detector",
    "Edge",
    "EdgeSource",
    "Embedder",
    "Finding",
    "Format",
    "Layer",
    "LayerGraph",
    "LayerKind",
    "Param",
    "PluginComponent",
    "Presentable",
    "Restorer",
    "TensorRef",
    "Verdict",
    "__version__",
    "hookimpl",
]
