"""Outputs: DataComp's files per shard, written never-partial, their checks, and what produced them."""
