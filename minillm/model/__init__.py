"""The model side: loading models (hub, local, GGUF), architecture adapters, structural
surgery, and saving/loading pruned outputs (safetensors shards, ``modeling_minillm.py``)."""
