"""Exceptions raised by diffim_dag.

Every error a user can provoke with bad input is an :class:`InputError` (or a
subclass) whose message names the file, plane or keyword at fault.  The
``permanent`` flag tells the batch runner whether a retry could help.
"""
from __future__ import annotations

__all__ = [
    "DiffimError",
    "InputError",
    "ConfigError",
    "NoWorkFound",
    "InsufficientKernelSourcesError",
    "NoKernelCandidatesError",
    "PsfError",
]


class DiffimError(Exception):
    """Base class of diffim_dag's errors."""

    #: A permanent error will fail again on retry (bad input, no coverage, too few sources).
    permanent: bool = True


class InputError(DiffimError, ValueError):
    """Bad input data: the message names the file, plane or keyword."""


class ConfigError(DiffimError, ValueError):
    """Bad configuration: the message names the field (and the nearest valid one)."""


class PsfError(InputError):
    """A PSF model or PSF image cannot be used."""


class NoWorkFound(DiffimError):
    """Nothing to do for this input (e.g. too little template coverage).

    Attributes
    ----------
    coverage : float or None
        The fraction of science pixels with template data, when known.
    """

    def __init__(self, message: str, *, coverage: float | None = None):
        super().__init__(message)
        self.coverage = coverage


class InsufficientKernelSourcesError(DiffimError):
    """Too few usable kernel sources.

    Attributes
    ----------
    found : int
        Sources found before the cuts.
    used : int
        Sources that survived every cut.
    rejected : dict[str, int]
        How many sources each cut removed.
    """

    def __init__(self, message: str, *, found: int = 0, used: int = 0, rejected: dict[str, int] | None = None):
        super().__init__(message)
        self.found = found
        self.used = used
        self.rejected = dict(rejected or {})


class NoKernelCandidatesError(DiffimError):
    """No kernel candidate survived the fits and the spatial re-assessment."""

    def __init__(self, message: str, *, rejected: dict[str, int] | None = None):
        super().__init__(message)
        self.rejected = dict(rejected or {})
