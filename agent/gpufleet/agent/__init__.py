"""Node agent: GPU probe, instance runtime, connection to the control plane."""
