"""The sweep commands' input checks; the malformed inputs are in tests/bad_inputs.yaml
(run by tests/test_bad_input.py)."""

from __future__ import annotations

from click.testing import CliRunner

from orchestrator.cli import main
from sweep_helpers import DIGITS_SPACE


def test_validate_accepts_every_shipped_space():
    for path in sorted((DIGITS_SPACE.parent).glob("*.yaml")):
        result = CliRunner().invoke(main, ["validate", str(path)])
        assert result.exit_code == 0, result.output
        assert "valid space file" in result.output
