"""d2m's PostgreSQL event log storage: Dagster's own, with a run's planned events written in batches.

Why: when Dagster creates a run of N shards (the backfill daemon, `dagster asset materialize`, `d2m run`), it
first stores one ASSET_MATERIALIZATION_PLANNED event per asset and per shard (per-shard "materializing" and
"failed" statuses and automation's in_progress / execution_failed are computed from them). Dagster's
PostgreSQL storage writes each with two new connections and three statements: 43 ms an event on the bench
machine (bench/backfill_submit.py), about 6 minutes for a run of 1,024 shards and 8 assets, all in the
daemon's backfill iteration, before the next run is submitted. Dagster already hands these events to
the storage in batches when DAGSTER_EVENT_BATCH_SIZE is set, but its PostgreSQL storage writes only batches
of materializations or observations at once and the others one at a time. Here a batch's planned
materializations are one INSERT, and each asset's row is updated once (from its last planned event, as
one event at a time would leave it); every other event is stored as Dagster stores it.

It also keeps the last list of each dynamic partitions definition's keys it read: Dagster reads all of a
definition's keys several times for each run it creates (about 8 reads per run of the backfill daemon, each
growing with the shards: 0.16 s at 12,800, about 1.7 s at 128,000). A read first asks PostgreSQL for the
definition's key count and the table's highest row id (one small query); if neither changed, the keys are
the ones read last. Keys are only ever added (a new, higher id) or deleted (one fewer key), so any change
is seen, from any process.

Use it with `event_log_storage` in dagster.yaml (deploy/dagster-postgres.yaml). Creating it sets
DAGSTER_EVENT_BATCH_SIZE (unless set) in the process that uses it, so that the daemon, the webserver and
run workers batch without a setting of their own.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from dagster import DagsterEventType
from dagster._core.events.log import EventLogEntry
from dagster._core.storage.event_log.schema import DynamicPartitionsTable, SqlEventLogStorageTable
from dagster._serdes import ConfigurableClassData
from dagster_postgres.event_log import PostgresEventLogStorage
from dagster_postgres.utils import get_token_provider_from_config, pg_url_from_config

BATCH_ENV = "DAGSTER_EVENT_BATCH_SIZE"
BATCH_SIZE = 1000  # events per INSERT, as the new-shards sensor writes raw_shards events
PLANNED = DagsterEventType.ASSET_MATERIALIZATION_PLANNED


def _groups(events: Sequence[EventLogEntry]) -> list[tuple[bool, list[EventLogEntry]]]:
    """Consecutive runs of planned materializations (True) and of other events (False), in order."""
    groups: list[tuple[bool, list[EventLogEntry]]] = []
    for event in events:
        planned = event.dagster_event_type == PLANNED
        if groups and groups[-1][0] == planned:
            groups[-1][1].append(event)
        else:
            groups.append((planned, [event]))
    return groups


class BatchedPostgresEventLogStorage(PostgresEventLogStorage):
    """PostgresEventLogStorage whose batches of planned materializations are one INSERT each."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        os.environ.setdefault(BATCH_ENV, str(BATCH_SIZE))
        self._partition_keys: dict[str, tuple[tuple[int, int | None], list[str]]] = {}

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None,
                          config_value: Mapping[str, Any]) -> BatchedPostgresEventLogStorage:
        return cls(inst_data=inst_data, postgres_url=pg_url_from_config(config_value),
                   should_autocreate_tables=config_value.get("should_autocreate_tables", True),
                   token_provider=get_token_provider_from_config(config_value))

    def store_event_batch(self, events: Sequence[EventLogEntry]) -> None:
        for planned, group in _groups(events):
            if planned and len(group) > 1:
                self._store_planned(group)
            else:
                super().store_event_batch(group)

    def _store_planned(self, events: list[EventLogEntry]) -> None:
        """What `store_event` does for each planned event (the event's row; the asset's row with the run and
        time of its last event; planned events carry no indexed tags), in one INSERT and one transaction."""
        insert = SqlEventLogStorageTable.insert().returning(SqlEventLogStorageTable.c.id, sort_by_parameter_order=True)
        with self._connect() as conn:  # one statement compiled once, its rows sent as multi-row VALUES
            result = conn.execute(insert, [self._event_to_row(event) for event in events])
            ids = [int(row[0]) for row in result.fetchall()]
        last: dict[Any, tuple[EventLogEntry, int]] = {}
        for event, event_id in zip(events, ids, strict=True):
            last[event.dagster_event.asset_key] = (event, event_id)  # type: ignore[union-attr]
        with self.index_transaction() as conn:
            self._store_asset_event_tags(conn, events, ids)
            for event, event_id in last.values():
                self._store_asset_event(conn, event, event_id)

    def get_dynamic_partitions(self, partitions_def_name: str) -> Sequence[str]:
        """The definition's keys in the order they were added, read in full only when they changed since the
        last read (see the module docstring)."""
        stamp = self._partitions_stamp(partitions_def_name)  # before the keys: a list is never older than its stamp
        last = self._partition_keys.get(partitions_def_name)
        if last is not None and last[0] == stamp:
            return list(last[1])
        keys = super().get_dynamic_partitions(partitions_def_name)  # a new list; callers get copies of it
        self._partition_keys[partitions_def_name] = (stamp, keys)
        return list(keys)

    def _partitions_stamp(self, partitions_def_name: str) -> tuple[int, int | None]:
        table = DynamicPartitionsTable
        count = sa.select(sa.func.count()).where(table.c.partitions_def_name == partitions_def_name).scalar_subquery()
        query = sa.select(count, sa.select(sa.func.max(table.c.id)).scalar_subquery())
        with self.index_connection() as conn:
            keys, highest = conn.execute(query).one()
        return int(keys), highest
