"""The job controller: membership, epochs, recovery planning, rendezvous and its gRPC service."""
