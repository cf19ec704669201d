import json
import math

from hypothesis import given
from hypothesis import strategies as st

from d2m_core.outputs.jsontext import json_texts

SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text()
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                      max_leaves=20)


def test_the_strings_of_json_dumps() -> None:
    values = [{"uid": "0" * 32, "caption": "caf\xe9 \u2603 \U0001F600 \"q\" \\ \n", "w": 640, "r": 0.1, "big": 2**70,
               "nan": math.nan, "inf": -math.inf, "nested": {"a": [1, 2.5, None, True]}, "": []}, None, {}, [], "s", 1.5]
    assert json_texts(values) == [json.dumps(v) if v is not None else None for v in values]


@given(st.lists(VALUES, max_size=5))
def test_any_parsed_json(values: list) -> None:
    assert json_texts(values) == [json.dumps(v) if v is not None else None for v in values]
