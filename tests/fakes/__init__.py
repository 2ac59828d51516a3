"""Test doubles at the system boundaries that tests cannot have for real (the GPU driver)."""
