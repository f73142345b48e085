"""The doors onto the engine: `run-batch` (OpenAI batch files), `serve` (an OpenAI-compatible HTTP server with
the Batch API). `protocol` holds the request and response types all of them share."""
