"""The JSON codec on deeply nested values: only ValueError or TypeError, never RecursionError."""

from __future__ import annotations

from typing import Any

import pytest

from qwen_persist import jsonlib

LONG_NUMBER = "1234567890123456789012345"  # 20+ digits: parsed by the standard library, not orjson


def nested_list(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("leaf", ["1", LONG_NUMBER])
def test_loads_refuses_deep_nesting_with_value_error(leaf: str) -> None:
    value = jsonlib.loads("[" * 500 + leaf + "]" * 500)
    for _ in range(500):
        value = value[0]
    assert value == int(leaf)
    with pytest.raises(ValueError, match="depth"):
        jsonlib.loads("[" * 5000 + leaf + "]" * 5000)


def test_dumps_refuses_deep_nesting_with_value_error() -> None:
    # Past orjson's 254 levels the standard library takes over, as deep as the stack lets it.
    assert jsonlib.dumps(nested_list(600)) == "[" * 600 + "1" + "]" * 600
    with pytest.raises(ValueError, match="depth"):
        jsonlib.dumps(nested_list(5000))
