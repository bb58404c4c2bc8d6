"""Passwords in store URLs: masked wherever a URL is shown or kept, revealed only in memory.

A tracking URI or study storage such as ``postgresql://user:secret@host/db`` is printed,
written to ``sweep.json`` and to Tune's experiment state, and logged to MLflow as
``postgresql://user:***@host/db``. A process that reconnects later (``resume``, ``status``,
``promote``) is given the full URL again (``--tracking-uri``/``--study-storage`` or their
environment variables) and matches it to the stored one by everything but the password.
Objects that Tune pickles keep the masked URL (:class:`MaskedWhenPickled`) and call
:func:`reveal` when they connect.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["MASK", "MaskedWhenPickled", "has_secret", "mask", "remember", "reveal"]

MASK = "***"
_SECRET_QUERY_KEYS = frozenset({"password", "passwd", "pwd", "token", "secret"})
_known: dict[str, str] = {}  # masked URL -> full URL, for the URLs this process was given


def _split(url: str):
    try:
        return urlsplit(url)
    except ValueError:  # not a URL at all (an invalid port, brackets): nothing to mask
        return None


def mask(url: str) -> str:
    """`url` with its password (and any ``password=``/``token=`` query value) as ``***``."""
    parts = _split(url)
    if parts is None:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostinfo = netloc.rpartition("@")
        user, has_password, _ = userinfo.partition(":")
        if has_password:
            netloc = f"{user}:{MASK}@{hostinfo}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(key.lower() in _SECRET_QUERY_KEYS for key, _ in pairs):
            masked = [(k, MASK if k.lower() in _SECRET_QUERY_KEYS else v) for k, v in pairs]
            query = urlencode(masked, safe="*")
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def has_secret(url: str) -> bool:
    return mask(url) != url


def remember(url: str) -> str:
    """Keep the full `url` in this process (for :func:`reveal`); returns its masked form."""
    masked = mask(url)
    if masked != url:
        _known[masked] = url
    return masked


def reveal(url: str, candidates: Iterable[str | None] = ()) -> str:
    """The full URL behind a masked `url`: one of `candidates` (full URLs the user gave)
    or one remembered in this process; `url` itself when nothing in it is masked.
    Raises LookupError when the password is not available."""
    if MASK not in url:
        return url
    for candidate in candidates:
        if candidate and remember(candidate) == url:
            return candidate
    if url in _known:
        return _known[url]
    raise LookupError(url)


class MaskedWhenPickled:
    """Base of the objects Tune pickles into the sweep directory (callbacks, the searcher):
    the attributes named in `_secret_fields` are pickled masked (a URL by :func:`mask`, a
    value with store URLs by its ``masked()``), those in `_fresh_fields` as newly made (live
    clients and caches, rebuilt after unpickling)."""

    _secret_fields: ClassVar[tuple[str, ...]] = ()
    _fresh_fields: ClassVar[tuple[tuple[str, Callable[[], Any]], ...]] = ()  # (name, make)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in self._secret_fields:
            value = state[key]
            state[key] = mask(value) if isinstance(value, str) else value.masked()
        return state | {key: make() for key, make in self._fresh_fields}
