"""ralmspec-vllm: lossless speculative retrieval for iterative retrieval-augmented LMs on vLLM.

Layout (the architecture, top to bottom):

- ``core/``        vLLM-free request state machine: baseline iterative RaLM and RaLMSpec
                   (speculation cache, batched verification, rollback, prefetch, OS3 stride
                   scheduler, asynchronous verification).
- ``retrieval/``   knowledge base, retrievers (exact/approximate dense, BM25), query encoder,
                   gRPC retriever service and client.
- ``engine/``      the only package that imports vLLM: generation adapter, scheduler hook.
- ``entrypoints/`` the ``ralmspec-vllm`` CLI and the OpenAI-compatible server.
"""

__version__ = "0.1.0"

from ralmspec_vllm.openblas import prefer_native_kernels

prefer_native_kernels()  # before faiss loads its bundled OpenBLAS 0.3.15: see openblas.py
