"""dlorch.orchestrator: the single writer of job state, the queue and the CLI."""
