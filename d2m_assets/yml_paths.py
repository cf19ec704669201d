"""Where a yml's relative paths resolve, recorded in the instance so every process agrees.

The seed resolves relative paths (input_tars, output_metadata_dir, custom_pypath) against the working
directory. `d2m run` and `d2m register` do the same and record that folder for the yml in
$DAGSTER_HOME/d2m/yml_dirs.json; the Dagster definitions (webserver, daemon, run workers, `dagster asset
materialize`), whatever their own working directory, resolve the same yml against the recorded folder.
A yml never registered resolves against the process's working directory, with a warning if it has
relative paths.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from d2m_core.config import D2MConfig, load_config, relative_path_fields

log = logging.getLogger(__name__)
RECORD = Path("d2m") / "yml_dirs.json"


def _record_file() -> Path | None:
    home = os.environ.get("DAGSTER_HOME")
    return Path(home) / RECORD if home else None


def _records() -> dict[str, str]:
    path = _record_file()
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def record_base_dir(yml: str | Path, base_dir: str | Path | None = None) -> Path:
    """Record the folder `yml`'s relative paths resolve against (default: the working directory); returns it.
    Needs DAGSTER_HOME set (the caller has set up the instance)."""
    path = _record_file()
    assert path is not None, "DAGSTER_HOME must be set before recording"
    key, base = str(Path(yml).resolve()), Path(base_dir or Path.cwd()).resolve()
    records = _records()
    if records.get(key) != str(base):
        records[key] = str(base)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(records, indent=2, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    return base


def base_dir_for(yml: str | Path) -> Path:
    """The recorded folder for `yml`, else the working directory (warning when the yml has relative paths)."""
    recorded = _records().get(str(Path(yml).resolve()))
    if recorded is not None:
        return Path(recorded)
    relative = relative_path_fields(yml) if Path(yml).is_file() else []
    if relative:
        log.warning("%s has relative paths (%s) and was never registered (`d2m register --yml` or `d2m run` from the "
                    "folder they are relative to): resolving them against the working directory %s",
                    yml, ", ".join(relative), Path.cwd())
    return Path.cwd()


def load_recorded_config(yml: str | Path) -> D2MConfig:
    """The yml as every Dagster process sees it: relative paths against the recorded folder."""
    return load_config(yml, base_dir_for(yml))
