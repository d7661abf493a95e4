"""Test doubles for what cannot run here, each checked against the real contract."""
