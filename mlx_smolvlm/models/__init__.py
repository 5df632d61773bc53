"""The SmolVLM model (vision tower, connector, decoder) and its KV caches."""
