"""Python SDK and the gpufleet CLI."""
