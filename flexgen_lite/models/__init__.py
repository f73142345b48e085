"""What a model is: its config, its checkpoint (safetensors or GGUF), the layers each family names (specs.py,
opt.py, llama.py) and the layer math they share (layers.py)."""
