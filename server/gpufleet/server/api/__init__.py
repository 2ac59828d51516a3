"""gRPC surface of the control plane: servicers, interceptors, error mapping."""
