"""Use cases, one module each: what a command does, from its arguments to its result.
The commands in :mod:`orchestrator.cli` parse, call one of these, and print."""
