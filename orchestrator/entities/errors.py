"""Errors the command line catches by class, free of the store libraries so that catching
them costs nothing (as ``trainer.data.errors`` does for ``DataError``), and the one line an
error is reported by."""

from __future__ import annotations

__all__ = ["ClusterUnavailable", "StoreUnavailable", "first_line"]


def first_line(err: BaseException) -> str:
    """`err`'s message to its first line (with what it names), or its class's name."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class ClusterUnavailable(RuntimeError):
    """A local Ray did not start (its message: one line, with Ray's reason)."""


class StoreUnavailable(RuntimeError):
    """A store stopped answering and the wait for it ran out (its message: one line)."""
