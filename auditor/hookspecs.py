"""Every hook auditor calls, grouped by the phase that calls it.

Plugins implement them with ``from auditor import hookimpl``. Capability hooks
receive a ``register`` callback owned by the core: it checks the component's
type, refuses a duplicate id and records which plugin supplied what. Their
return value is ignored, and nothing depends on the order plugins are called
in: the core sorts what was registered by id.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import jinja2
    import typer

    from auditor.bases import Attack, Detector, Embedder, Format, Restorer

hookspec = pluggy.HookspecMarker("auditor")
hookimpl = pluggy.HookimplMarker("auditor")


# --- Loading -------------------------------------------------------------------


@hookspec
def register_formats(register: Callable[[Format], None]) -> None:
    """Register model formats.

    Called once, the first time a model file is loaded or the plugins are
    listed. Call ``register(fmt)`` with a :class:`auditor.bases.Format` instance
    for each format. Formats are tried by descending ``priority``, then by id.
    """


# --- Restore ---------------------------------------------------------------------


@hookspec
def register_restorers(register: Callable[[Restorer], None]) -> None:
    """Register restorers, which undo function-preserving edits before detection.

    Called once, when an audit has a reference model. Call ``register(restorer)``
    with a :class:`auditor.bases.Restorer` instance for each; they run by
    ascending ``order``, then by id.
    """


# --- Detection -------------------------------------------------------------------


@hookspec
def register_detectors(register: Callable[[Detector], None]) -> None:
    """Register watermark detectors.

    Called once, when an audit starts. Call ``register(detector)`` with a
    :class:`auditor.bases.Detector` instance for each. Every detector whose
    ``scheme`` matches a supplied owner bundle (or whose ``scheme`` is empty)
    runs, in id order; one that raises becomes an error finding.
    """


# --- Owner side and robustness ---------------------------------------------------


@hookspec
def register_embedders(register: Callable[[Embedder], None]) -> None:
    """Register watermark embedders.

    Called once, when ``auditor embed`` runs or the plugins are listed. Call
    ``register(embedder)`` with a :class:`auditor.bases.Embedder` instance for each.
    """


@hookspec
def register_attacks(register: Callable[[Attack], None]) -> None:
    """Register removal and ambiguity attacks.

    Called once, when ``auditor attack`` or ``auditor evaluate`` runs or the
    plugins are listed. Call ``register(attack)`` with a
    :class:`auditor.bases.Attack` instance for each.
    """


# --- Command line and report -------------------------------------------------------


@hookspec
def register_commands(app: typer.Typer) -> None:
    """Add commands to the ``auditor`` command line.

    Called once, when the CLI starts, with the root Typer ``app``; use
    ``@app.command()`` or ``app.add_typer()``. A name that clashes with a
    built-in command is refused.
    """


@hookspec
def prepare_jinja2_environment(env: jinja2.Environment) -> None:
    """Change the Jinja2 environment the evidence report is rendered with.

    Called once for each new environment, after the core has set it up
    (auto-escaping on, the report templates loaded); add filters, globals or
    tests to ``env.filters``, ``env.globals`` or ``env.tests``. Every plugin is
    called; the return value is ignored.
    """
