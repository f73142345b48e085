"""Running a model under a placement policy: where weights, KV cache and activations live (storage, weights,
weight slots, kv_cache, activations), and the zig-zag block schedule that moves and computes them
(block_schedule.py; cache_attention.py attends over each cache part where it lives; decode_graph.py replays a
resident decode step as one CUDA graph)."""
