"""The OpenAI request model the doors share: request types (protocol.py), a request made a prompt and its
sampling (requests.py), requests answered in blocks through FlexGenLite (runner.py), and the lines of a batch
file (batch_lines.py). `serve/` (HTTP, Batch API, run-batch) and `ray/` stand on it; neither imports the other."""
