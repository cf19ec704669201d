"""The `shards` partitions (one per input tar, keyed by its stem) and the GPU pool the tar pass runs in."""

from dagster import DynamicPartitionsDefinition

SHARDS = "shards"
shard_partitions = DynamicPartitionsDefinition(name=SHARDS)

# Steps that run models on a GPU claim a slot of this pool; its limit (the number of GPUs) is set on the
# instance (`d2m run` sets it when unset; `dagster instance concurrency set gpu N` changes it).
GPU_POOL = "gpu"
