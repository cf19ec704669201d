"""The `shards` partitions: one dynamic partition per input tar, keyed by the tar's stem."""

from dagster import DynamicPartitionsDefinition

SHARDS = "shards"
shard_partitions = DynamicPartitionsDefinition(name=SHARDS)
