"""Layer 5: environments, pipeline definitions, compile, the local runner, submit, schedule, the CLI."""
