"""The ``auditor`` command line: :mod:`.root` (the root app and its entry point), one module per command
group, and :mod:`.console`, the terminal helpers that built-in and third-party commands share."""

from auditor.cli.root import app, main

__all__ = ["app", "main"]
