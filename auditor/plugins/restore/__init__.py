"""Restore: undo function-preserving edits of a suspect against the owner's reference model.

Specification: shared/specs/restore.md; user guide: docs/restore.md.
"""
