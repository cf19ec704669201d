"""What a config selects and needs, without importing torch: its assets, its verified weights, and where
d2m's own per-asset files live. The Dagster definitions (code servers, the daemon, the webserver) need only
these, so they load without the compute stack; a config with `custom_pypath` imports its plugin (and so
torch) here, since the plugin decides which assets and weights exist."""

from __future__ import annotations

from d2m_core import catalog
from d2m_core.compute.weights import resolve_weights, weights_dir
from d2m_core.compute.weights_files import DEDUP_REFERENCE_FILES, MODEL_FILES, REFERENCE_MODEL, resolve_builtin_weights
from d2m_core.config import D2MConfig
from d2m_core.outputs import storage
from d2m_core.outputs.records import ShardStats, WeightsRecord


def selected_assets(config: D2MConfig) -> list[str]:
    """Validate what the config asks for against the catalog; returns the asset names it selects."""
    if config.custom_pypath:
        from d2m_core.compute.plugins import install_plugin

        install_plugin(config.custom_pypath)
    return catalog.assets_for_config(config.models, config.postprocess_columns, config.postprocess_features)


def verify_weights(config: D2MConfig) -> list[WeightsRecord]:
    """Find and check every weights file the config needs (models, dedup reference); raises on the first gap.
    Built-in models are checked from the weights catalog (as their classes check them); a plugin's models,
    and every model of a config with plugins (a plugin may replace a built-in name), through their classes."""
    directory = weights_dir(config.weights_dir)
    assets = selected_assets(config)
    records = []
    for model in config.models:
        if model in MODEL_FILES and not config.custom_pypath:
            records.append(resolve_builtin_weights(model, directory).record)
        else:
            from d2m_core.compute.models import resolve_model_weights

            records.append(resolve_model_weights(model, config.weights_dir).record)
    if catalog.REFERENCE_ASSET in assets:
        records.append(resolve_weights(REFERENCE_MODEL, DEDUP_REFERENCE_FILES, directory).record)
    return records


def artifact_url(config: D2MConfig, asset: str, stem: str, ext: str) -> str:
    """Where d2m keeps an asset's own file for a shard (`<artifacts_root>/<asset>/<stem>.<ext>`)."""
    return storage.join(config.artifacts_root, asset, f"{stem}.{ext}")


def stored_stats(config: D2MConfig, stem: str) -> ShardStats | None:
    """The counts and failures of a shard's last feature pass, or None when it has none."""
    url = artifact_url(config, catalog.SAMPLES, stem, "json")
    return ShardStats.from_dict(storage.read_json(url)) if storage.exists(url) else None


def shard_stats(config: D2MConfig, stem: str) -> ShardStats:
    """The stored counts and failures of a shard's last feature pass."""
    return ShardStats.from_dict(storage.read_json(artifact_url(config, catalog.SAMPLES, stem, "json")))
