"""Which shards were materialized from another tar, output location or weights than a run would use now:
the automation condition `identity_changed`, read from the data versions Dagster records per partition.

A shard asset's data version digests three parts: its tar (the digest the discovery sensor records as the
data version of the shard's raw_shards, re-checked there as tars change), its output location and its weights
(one value per asset, from the config; weights are hashed once per process per unchanged file). The shard is
stale when its latest materialization's data version differs from the one those parts give now.

Cost per evaluation, bounded at any shard count: each asset's recorded versions (and raw_shards' tar digests)
are kept in memory and brought up to date from the materializations recorded since the last evaluation only
(two indexed queries restricted by storage id, per asset). Every shard is read once, when the process (the
code server) first evaluates the asset; after that an evaluation costs what was materialized since the one
before, plus one pass over the shards in memory when the config's output location or weights change.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field

from dagster import (AssetKey, AutomationCondition, AutomationContext, AutomationResult, DagsterEventType,
                     DagsterInstance)

from d2m_assets.datasets import Dataset
from d2m_assets.partitions import RAW_SHARDS
from d2m_assets.assets.reporting import DATA_VERSION_TAG
from d2m_core.outputs.identity import asset_identity, version_of, weights_by_model
from d2m_core.selection import verify_weights

_MATERIALIZATION = DagsterEventType.ASSET_MATERIALIZATION


@dataclass
class RecordedVersions:
    """One asset's latest data version per shard, read incrementally (only what was recorded since)."""

    after: int | None = None  # storage id of the last materialization read
    versions: dict[str, str | None] = field(default_factory=dict)

    def update(self, instance: DagsterInstance, key: AssetKey) -> set[str]:
        """Read the materializations recorded since the last call; returns the shards they changed."""
        storage = instance.event_log_storage
        latest = storage.get_latest_storage_id_by_partition(key, _MATERIALIZATION, after_cursor=self.after)
        if not latest:
            return set()
        tags = storage.get_latest_tags_by_partition(key, _MATERIALIZATION, [DATA_VERSION_TAG],
                                                    asset_partitions=list(latest), after_cursor=self.after)
        for shard in latest:
            self.versions[shard] = tags.get(shard, {}).get(DATA_VERSION_TAG)
        self.after = max(latest.values())
        return set(latest)


@dataclass
class StaleShards:
    """One asset's shards whose recorded data version differs from the one its tar (raw_shards' recorded
    digest), the config's output location and weights give now."""

    asset: RecordedVersions = field(default_factory=RecordedVersions)
    tars: RecordedVersions = field(default_factory=RecordedVersions)
    config_parts: tuple[str, str] | None = None
    stale: set[str] = field(default_factory=set)
    unchecked: set[str] = field(default_factory=set)  # read by `recorded`, not yet compared by `update`
    lock: threading.Lock = field(default_factory=threading.Lock)

    def recorded(self, instance: DagsterInstance, key: AssetKey, shards: Iterable[str]) -> set[str]:
        """Those of `shards` with a materialization recorded now (what was recorded since the last read)."""
        with self.lock:
            self.unchecked |= self.asset.update(instance, key)
            return {shard for shard in shards if shard in self.asset.versions}

    def update(self, instance: DagsterInstance, key: AssetKey, raw_key: AssetKey, config_parts: tuple[str, str]) -> set[str]:
        with self.lock:
            changed = self.unchecked | self.asset.update(instance, key) | self.tars.update(instance, raw_key)
            self.unchecked = set()
            if config_parts != self.config_parts:  # the config changed: every shard is compared once
                self.config_parts, changed = config_parts, set(self.asset.versions)
            output, weights = config_parts
            for shard in changed:
                tar = self.tars.versions.get(shard)
                recorded = self.asset.versions.get(shard)
                if shard in self.asset.versions and tar is not None and recorded != version_of(
                        {"tar": tar, "output": output, "weights": weights}):
                    self.stale.add(shard)
                else:  # matches, never materialized (`missing` covers it) or its tar never reported
                    self.stale.discard(shard)
            return set(self.stale)


_STATE: weakref.WeakKeyDictionary[DagsterInstance, dict[AssetKey, StaleShards]] = weakref.WeakKeyDictionary()
_STATE_LOCK = threading.Lock()


def stale_shards(instance: DagsterInstance, key: AssetKey) -> StaleShards:
    with _STATE_LOCK:
        return _STATE.setdefault(instance, {}).setdefault(key, StaleShards())


def config_parts(dataset: Dataset, asset: str) -> tuple[str, str]:
    """The (output, weights) parts of the identity a run of `asset` would record now."""
    config = dataset.load()
    identity = asset_identity(config, asset, None, weights_by_model(verify_weights(config)))
    return identity.parts["output"], identity.parts["weights"]


class _ShardsCondition(AutomationCondition[AssetKey]):
    """A condition true for the candidate shards in the set `shards` computes (evaluated in the code server)."""

    label = ""
    explanation = ""

    def __init__(self, dataset: Dataset) -> None:
        self._dataset = dataset

    @property
    def requires_cursor(self) -> bool:
        return False

    @property
    def name(self) -> str:
        return self.label

    @property
    def description(self) -> str:
        return self.explanation

    def shards(self, context: AutomationContext) -> set[str]:
        raise NotImplementedError

    def evaluate(self, context: AutomationContext) -> AutomationResult:
        if context.candidate_subset.is_empty:
            return AutomationResult(context, context.get_empty_subset())
        shards = self.shards(context)
        if not shards:
            return AutomationResult(context, context.get_empty_subset())
        subset = context.asset_graph_view.get_subset_from_partition_keys(context.key, context.partitions_def, shards)
        return AutomationResult(context, context.candidate_subset.compute_intersection(subset))


class IdentityChanged(_ShardsCondition):
    """True for a shard whose latest materialization's data version differs from the one its tar (as last
    reported), the dataset's output location and weights give now."""

    label = "identity_changed"
    explanation = "materialized from another tar, output location or weights"

    def shards(self, context: AutomationContext) -> set[str]:
        try:
            parts = config_parts(self._dataset, context.key.path[-1])
        except Exception as err:  # noqa: BLE001 - a yml or weights problem: the runs would fail; request nothing
            context.log.warning(f"identity of {context.key.to_user_string()} not known: {err}")
            return set()
        instance = context.asset_graph_view.instance
        raw_key = self._dataset.key(RAW_SHARDS)
        return stale_shards(instance, context.key).update(instance, context.key, raw_key, parts)


class RecordedNow(_ShardsCondition):
    """True for a shard with a materialization recorded at the moment this is evaluated.

    Dagster's `missing` reads materializations as of the evaluation's start, while `in_progress` reads runs as
    they are when it is computed: a run that records a shard and ends between the two leaves that shard
    `missing` and not in progress, so it would be requested a second time (seen under load: a shard
    materialized twice). `~recorded_now`, evaluated after `in_progress`, leaves it out: a run seen as not in
    progress has recorded its shards before this reads them. It reads only what was recorded since the last
    read (the state `identity_changed` keeps)."""

    label = "recorded_now"
    explanation = "a materialization is recorded (read now, not as of the evaluation's start)"

    def shards(self, context: AutomationContext) -> set[str]:
        instance = context.asset_graph_view.instance
        candidates = context.candidate_subset.expensively_compute_partition_keys()
        return stale_shards(instance, context.key).recorded(instance, context.key, candidates)
