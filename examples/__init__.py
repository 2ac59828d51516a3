"""Example model servers and deployment specs used by demos and tests (not installed)."""
