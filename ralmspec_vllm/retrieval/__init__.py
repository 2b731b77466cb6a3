"""Knowledge base and retrieval: backends behind one protocol, query encoder, gRPC service."""
