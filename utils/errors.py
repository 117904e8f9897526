"""Errors shared by the stack's layers. Imports nothing from the layers, so any of them can raise these."""


class StackError(ValueError):
    """An invalid combination of flags or an invalid config, reported before any work is done, naming the fix."""


class LibraryLimitation(StackError):
    """A combination that a library the harness applies (diffusers' cache hooks, cache-dit) cannot run, whatever the
    machine. A single run stops with it like any StackError; a sweep lists the variant as failed with this reason
    and runs the others (a comparison lists what a library cannot do, it does not drop it)."""
