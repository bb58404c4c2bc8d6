"""Errors the command line catches by class, free of the store libraries so that catching
them costs nothing (as ``trainer.data.errors`` does for ``DataError``)."""

from __future__ import annotations

__all__ = ["ClusterUnavailable", "StoreUnavailable"]


class ClusterUnavailable(RuntimeError):
    """A local Ray did not start (its message: one line, with Ray's reason)."""


class StoreUnavailable(RuntimeError):
    """A store stopped answering and the wait for it ran out (its message: one line)."""
