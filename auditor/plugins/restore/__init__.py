"""Restore: undo function-preserving edits of a suspect against the owner's reference model.

Design notes: docs/design/restore.md; user guide: docs/restore.md.
"""
