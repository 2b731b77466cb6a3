"""vLLM-free core: iterative RaLM and RaLMSpec request logic. Imports neither vLLM nor gRPC.

One concept per module, top to bottom:

- ``config``       ``RaLMConfig`` (what is generated) and ``SpeculationConfig`` (how fast:
                   stride or OS3, prefetch, async verification, cache), ablation ``PRESETS``.
- ``lm``           the ``LanguageModel`` and ``Tokenizer`` protocols the engine adapter meets.
- ``stop``         stop strings and stop token ids: where an answer ends, what text is shown.
- ``prompt``       prompt layout ([prefix] doc + separator + question + generated), query
                   window, the shared document-token cache.
- ``request``      one request's state; ``generate_step``, ``search``, ``truncate``,
                   ``finalize`` (tokens that can no longer be rolled back).
- ``baseline``     iterative RaLM (the reference) and the oracle.
- ``cache``        per-request speculation cache and KB-consistent scorers (dense, ``score``).
- ``stride``       fixed stride and the OS3 scheduler.
- ``speculative``  RaLMSpec: speculate, batched verification, rollback, P, S, A.
- ``trace``        frozen per-request record (spans, retrieval calls, verifications, times).
- ``batching``     ``BatchingRetriever``: cross-request search batching.
- ``encoding``     query embedders for dense speculation (per call, or batched across requests).
- ``runner``       ``RaLMEngine``: the Python API (generate, generate_many, stream).

Modules are not re-exported here so that importing ``core.lm`` stays free of the rest.
"""
