"""Everything around trials: spaces, sweeps, cluster, tracking, CLI (docs/design.md §1)."""

from orchestrator.entities.env import set_library_defaults

set_library_defaults()
