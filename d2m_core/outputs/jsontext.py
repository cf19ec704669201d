"""The samples table's json strings: `json.dumps` of each sample's parsed json, encoded faster."""

from __future__ import annotations

import json
import json.encoder
from collections.abc import Sequence
from typing import Any


def json_texts(values: Sequence[Any | None]) -> list[str | None]:
    """`json.dumps(value)` of each value (None stays None): the same strings, through one C encoder made once
    with json.dumps' settings (json.dumps makes one a call: a third of its time on a sample's json). The
    values are parsed JSON, never circular, so the encoder keeps no circular-reference marks."""
    make = json.encoder.c_make_encoder
    if make is None:  # a Python without the _json accelerator
        return [json.dumps(value) if value is not None else None for value in values]
    defaults = json.JSONEncoder()
    encode = make(None, defaults.default, json.encoder.encode_basestring_ascii, None, defaults.key_separator,
                  defaults.item_separator, defaults.sort_keys, defaults.skipkeys, defaults.allow_nan)
    return ["".join(encode(value, 0)) if value is not None else None for value in values]
