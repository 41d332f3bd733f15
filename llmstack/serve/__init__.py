"""Serving: the paged KV cache, the continuous-batching engine with prefix caching, and the
OpenAI-compatible HTTP server with its chat page (`llmstack.serve.server`, imported on use:
it needs the `serve` extra, FastAPI and uvicorn)."""
from llmstack.serve.engine import Engine, Request, StepOutput
from llmstack.serve.paged import BlockPool, NoFreeBlocks, PagedKVCache, block_hash

__all__ = ["BlockPool", "Engine", "NoFreeBlocks", "PagedKVCache", "Request", "StepOutput", "block_hash"]
