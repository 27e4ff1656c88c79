"""Kernel tests: every backend against the reference, metamorphic properties, planted bugs."""
