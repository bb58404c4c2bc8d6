"""The ``orchestrate`` command line (docs/design.md §6): each command parses its options,
calls one use case of :mod:`orchestrator.workflows`, and prints.

Bad input ends with one line naming the problem and exit status 2, before Ray starts or
anything is recorded; that includes click's own usage errors (a bad flag, a missing
argument). Store URLs are printed with their passwords masked.
"""

from orchestrator.cli.main import main
from orchestrator.cli.options import EXIT_INTERRUPTED

__all__ = ["EXIT_INTERRUPTED", "main"]
