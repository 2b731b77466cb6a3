"""User-facing entry points: the ``ralmspec-vllm`` CLI and the OpenAI-compatible server."""
