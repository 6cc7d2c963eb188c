"""The gRPC server: servicers, worker pool, key registry wiring."""
