"""Pipeline definitions, per-environment config, compile, submit, schedule and the CLI."""
