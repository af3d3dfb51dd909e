"""``python -m dlorch.orchestrator.cli``: the ``dlorch`` command (how local agents and the tests start it)."""

from dlorch.orchestrator.cli import main

main()
