"""The fleet: what turns jobs into instances and instances into training (see docs/design.md)."""
