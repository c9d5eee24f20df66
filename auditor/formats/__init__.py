"""Built-in model formats: one module each, with the same API.

Each module exposes ``sniff(path, head) -> bool`` (a cheap look at content,
never the file name), ``load(path) -> LayerGraph`` (weights stay in the file
until read) and a :class:`auditor.bases.Format` subclass registered through
``register_formats``.
"""
