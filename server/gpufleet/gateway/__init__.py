"""Data plane: admission, routing, queueing and the gRPC gateway."""
