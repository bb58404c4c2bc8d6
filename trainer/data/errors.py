"""The data error: bad or missing data, said in one line. Imports nothing heavy, so the
command line can catch it without loading torch."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """A data set is missing or malformed; the message is one line for the user."""
