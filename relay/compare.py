"""Choosing what to compare, and comparing it: the one diff operation of the API, the UI and the CLI.

Deliveries ``a`` and ``b`` (``a`` defaults to the previous event of b's
prediction), or attempts ``attempt_a`` and ``attempt_b`` (``attempt_a``
defaults to the attempt made just before). The bodies compared are returned
too, so the side-by-side page does not read them a second time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from relay.diff import diff_attempts, diff_deliveries
from relay.store import NotFound, Store


@dataclass(frozen=True)
class Comparison:
    result: dict[str, Any]  # the JSON of GET /api/diff
    left: bytes | None
    right: bytes | None


async def compare_attempts(store: Store, a: int | None, b: int) -> Comparison:
    right = await store.get_attempt(b)
    if a is None:
        a = await store.previous_attempt(right)
        if a is None:
            raise NotFound(f"attempt {b} has no earlier attempt to compare with")
    left = await store.get_attempt(a)
    return Comparison(diff_attempts(left, right), left.response_body, right.response_body)


async def compare_deliveries(store: Store, a: int | None, b: int) -> Comparison:
    right = await store.get_delivery(b)
    if a is None:
        a = await store.previous_of_prediction(right)
        if a is None:
            raise NotFound(f"delivery {b} has no earlier event of the same prediction")
    left = await store.get_delivery(a)
    return Comparison(diff_deliveries(left, right), left.body, right.body)
