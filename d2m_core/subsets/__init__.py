"""Subsets: DataComp's filtering baselines, uid files, and resharding to a subset."""
