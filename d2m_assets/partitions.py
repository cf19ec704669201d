"""The external asset each dataset's partitions stand for, and the GPU pool the tar pass runs in.

A dataset's partitions definition (`<dataset>__shards`, one partition per input tar) comes from
`d2m_assets.datasets.Dataset.partitions`.
"""

RAW_SHARDS = "raw_shards"  # the input tars, as an external asset of each dataset

# Steps that run models on a GPU claim a slot of this pool; its limit (the number of GPUs) is set on the
# instance (`d2m run` sets it when unset; `dagster instance concurrency set gpu N` changes it).
GPU_POOL = "gpu"
