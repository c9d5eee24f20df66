"""Domain errors and the exit codes the CLI maps them to.

Every error a user can provoke with a file, an option or a plugin is one of
these; the CLI prints ``error: <message>`` on one line and exits with the
class's ``exit_code``. Anything else reaching the CLI is a bug in auditor and
exits with :data:`EXIT_INTERNAL`, still without a traceback (``AUDITOR_DEBUG=1``
shows it).
"""

from __future__ import annotations

from pathlib import Path

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_USAGE = 2
EXIT_INCONCLUSIVE = 3
EXIT_INPUT = 4
EXIT_UNSAFE = 5
EXIT_PLUGIN = 6
EXIT_INTERNAL = 70

EXIT_CODES: dict[int, str] = {
    EXIT_OK: "success (for an audit: the watermark was found)",
    EXIT_NOT_FOUND: (
        "audit completed: no watermark found; `report verify`: the report was altered or its signature does not verify;"
        " `embed`: the watermark just embedded would not be found (nothing written)"
    ),
    EXIT_USAGE: "bad command line (unknown option, missing argument)",
    EXIT_INCONCLUSIVE: (
        "audit completed: inconclusive; `evaluate`: a cell of the grid failed (each printed with its reason)"
    ),
    EXIT_INPUT: "input error: a file is missing, unreadable, truncated, malformed or of an unknown format",
    EXIT_UNSAFE: "input refused as unsafe: it holds code or objects to run, or points outside its folder",
    EXIT_PLUGIN: "plugin error: a plugin failed to load or registered something invalid",
    EXIT_INTERNAL: "internal error in auditor (a bug: please report it)",
}


class AuditorError(Exception):
    """Base class of every error auditor reports to a user."""

    exit_code = EXIT_INTERNAL


class InputError(AuditorError):
    """A file handed to auditor is missing, broken, truncated or not understood."""

    exit_code = EXIT_INPUT
    #: Whether the error came from an unanticipated exception (see :class:`LoaderBugError`).
    internal = False

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class LoaderBugError(InputError):
    """A format loader met malformed input it did not anticipate (an internal exception reached the
    load stage's catch-all).

    The user still sees one line and exit 4, like any :class:`InputError`; the distinct class lets the
    fuzz tests fail on it, because every such case is a loader bug to fix with a precise message.
    """

    #: Always true here: the failure came from an exception the loader did not raise on purpose.
    internal = True


class UnsafeInputError(InputError):
    """A file would run code, rebuild arbitrary objects, or read outside its folder."""

    exit_code = EXIT_UNSAFE


class BundleFieldError(ValueError):
    """A field of an owner bundle's payload that its scheme's schema refuses.

    A detector's :meth:`~auditor.bases.Detector.validate_bundle` raises it with the field's path in the
    payload (``params.bits``, ``layers[2].shape``) and why, in words that follow "field <path>" ("must be
    an integer from 1 to 4096, not 1000000000"); the core turns it into an :class:`InputError` naming the
    bundle file, before any suspect is read.
    """

    def __init__(self, field: str, why: str) -> None:
        self.field = field
        self.why = why
        super().__init__(f"field {field} {why}")


class PluginError(AuditorError):
    """A plugin failed to load or registered something invalid."""

    exit_code = EXIT_PLUGIN


class UsageError(AuditorError):
    """Options that contradict each other or name something that does not exist."""

    exit_code = EXIT_USAGE


class NotApplicableError(UsageError):
    """An attack asked of a model that has nothing it edits (no linear pair for an invertible map): a
    one-line usage error for ``auditor attack``; a cell ``auditor evaluate`` marks "not applicable",
    with the reason, rather than failed."""
