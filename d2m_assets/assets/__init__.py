"""The asset graph: raw_shards -> features (one pass) -> scores -> shard_metadata."""
