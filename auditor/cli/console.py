"""The terminal, for built-in and third-party commands alike: safe text, JSON output and the consoles.

Plugin commands (``register_commands``) print through these so that a name read
from a hostile file can never drive the terminal, and ``--json`` output looks
the same everywhere.
"""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

__all__ = ["emit_json", "err", "note", "out", "printable", "shown", "subcommands", "verbosity"]

#: Standard output and standard error; rich markup is interpreted, so pass untrusted text through :func:`shown`.
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


#: -1 with ``-q`` (only verdicts and errors), 0 by default, 1 with ``-v`` (notes and steps too).
verbosity = 0


def note(text: object, *, level: int = 0) -> None:
    """Print ``text`` (made safe) on standard error as ``note: ...`` when the verbosity is at least ``level``."""
    if verbosity >= level:
        err.print(shown(f"note: {text}"))


def printable(text: object) -> str:
    """``text`` with every control or unprintable character written as its escape (``\\x1b``, ``\\n``): a
    name from a hostile file must not move the cursor or recolour the screen. For plain output."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in str(text))


def shown(text: object) -> str:
    """:func:`printable`, with rich markup neutralised too: for text printed through :data:`out` or :data:`err`."""
    return escape(printable(text))


def emit_json(data: Any) -> None:
    """Print ``data`` as indented JSON on standard output (keys in the order given)."""
    typer.echo(json.dumps(data, indent=2, sort_keys=False))


def subcommands(app: typer.Typer, name: str, help: str) -> typer.Typer:
    """The command group ``name`` of ``app`` (``auditor embed``...), created with ``help`` if no plugin has
    made it yet, so that several plugins can add commands to one group."""
    for group in app.registered_groups:
        if group.name == name and group.typer_instance is not None:
            return group.typer_instance
    sub = typer.Typer(help=help, no_args_is_help=True)
    app.add_typer(sub, name=name)
    return sub
