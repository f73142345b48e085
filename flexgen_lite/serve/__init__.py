"""The doors onto the engine: `run-batch` (OpenAI batch files), `serve` (an OpenAI-compatible HTTP server with
the Batch API). The request and response types they share with `ray/` are in `openai_api/` (protocol.py)."""
