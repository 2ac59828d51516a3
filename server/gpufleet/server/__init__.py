"""Control plane: API servicers, store, scheduler, reconciler."""
