"""Errors shared by the stack's layers. Imports nothing from the layers, so any of them can raise these."""


class StackError(ValueError):
    """An invalid combination of flags or an invalid config, reported before any work is done, naming the fix."""
