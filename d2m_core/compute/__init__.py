"""Compute: models and their weights, the engine's one pass per shard, scores, plugins, devices."""
