"""Generated gRPC stubs for proto/retriever.proto: do not edit, run proto/generate.py."""
