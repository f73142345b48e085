"""Running a model under a placement policy: where weights, KV cache and activations live (storage, weights,
weight slots, kv_cache, activations), and the zig-zag block schedule that moves and computes them
(block_schedule.py; decode_graph.py replays a resident decode step as one CUDA graph)."""
