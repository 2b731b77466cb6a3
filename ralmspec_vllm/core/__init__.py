"""vLLM-free core: iterative RaLM and RaLMSpec request logic. Imports neither vLLM nor gRPC."""
