"""dlorch.nodeagent: one node's life: register, heartbeat, take a job, run it, report."""
