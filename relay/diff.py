"""Diffing two deliveries or two responses (pure): headers, JSON structure, or text.

JSON bodies are compared as structures with RFC 6902 operations (from the
``jsonpatch`` library), each carrying the ``old`` value it replaces, so a
reader sees ``replace /status: processing → succeeded`` rather than a wall of
changed lines. Bodies that are not both JSON get a unified text diff.
"""

from __future__ import annotations

import copy
import difflib
from typing import Any

import jsonpatch
import jsonpointer

from relay.model import Attempt, Delivery, HeaderPairs, display_text
from relay.prediction import parse_body
from relay.render import pretty_body


def diff_headers(a: HeaderPairs, b: HeaderPairs) -> list[dict[str, Any]]:
    """Headers added, removed or changed, by case-insensitive name (repeated values joined)."""

    def collect(headers: HeaderPairs) -> dict[str, tuple[str, str]]:
        out: dict[str, tuple[str, str]] = {}
        for name, value in headers:
            key = name.lower()
            if key in out:
                out[key] = (out[key][0], out[key][1] + ", " + display_text(value))
            else:
                out[key] = (display_text(name), display_text(value))
        return out

    left, right = collect(a), collect(b)
    changes: list[dict[str, Any]] = []
    for key in sorted(set(left) | set(right)):
        if key not in right:
            changes.append({"op": "removed", "name": left[key][0], "old": left[key][1], "new": None})
        elif key not in left:
            changes.append({"op": "added", "name": right[key][0], "old": None, "new": right[key][1]})
        elif left[key][1] != right[key][1]:
            changes.append({"op": "changed", "name": right[key][0], "old": left[key][1], "new": right[key][1]})
    return changes


def json_ops(old: Any, new: Any) -> list[dict[str, Any]]:
    """RFC 6902 operations turning ``old`` into ``new``, each with the ``old`` value it replaces.

    Each operation applies to the result of the ones before it, so the old
    value is looked up in a working copy that the patch is applied to step by step.
    """
    ops = []
    working = copy.deepcopy(old)
    for op in jsonpatch.make_patch(old, new):
        entry = dict(op)
        if entry["op"] in ("replace", "remove"):
            entry["old"] = jsonpointer.resolve_pointer(working, entry["path"], None)
        elif entry["op"] == "move":
            entry["old"] = jsonpointer.resolve_pointer(working, entry["from"], None)
        working = jsonpatch.apply_patch(working, [op], in_place=False)
        ops.append(entry)
    return ops


def text_diff(a: bytes | None, b: bytes | None, a_name: str, b_name: str) -> str:
    left = (a or b"").decode("utf-8", "replace").splitlines()
    right = (b or b"").decode("utf-8", "replace").splitlines()
    return "\n".join(difflib.unified_diff(left, right, a_name, b_name, lineterm=""))


def diff_bodies(a: bytes | None, b: bytes | None, a_name: str = "a", b_name: str = "b") -> dict[str, Any]:
    """``{"body": ops or None, "text": unified diff or None, "same": bool}``."""
    doc_a, fmt_a = parse_body(a)
    doc_b, fmt_b = parse_body(b)
    if fmt_a == "json" and fmt_b == "json":
        ops = json_ops(doc_a, doc_b)
        return {"body": ops, "text": None, "same": not ops}
    return {"body": None, "text": text_diff(a, b, a_name, b_name) or None, "same": (a or b"") == (b or b"")}


def side_by_side(a: bytes | None, b: bytes | None) -> list[tuple[str, str, str]]:
    """Aligned (tag, left line, right line) rows for the UI; JSON is pretty-printed first."""

    def lines(body: bytes | None) -> list[str]:
        pretty = pretty_body(body)
        return (pretty if pretty is not None else (body or b"").decode("utf-8", "replace")).splitlines()

    left, right = lines(a), lines(b)
    rows: list[tuple[str, str, str]] = []
    matcher = difflib.SequenceMatcher(a=left, b=right, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            rows.extend(("equal", left[i], right[j]) for i, j in zip(range(i1, i2), range(j1, j2), strict=True))
            continue
        span = max(i2 - i1, j2 - j1)
        for k in range(span):
            lval = left[i1 + k] if i1 + k < i2 else ""
            rval = right[j1 + k] if j1 + k < j2 else ""
            rows.append((tag, lval, rval))
    return rows


def diff_deliveries(a: Delivery, b: Delivery) -> dict[str, Any]:
    """The API's diff of two deliveries (SPEC §5): headers, JSON ops with old values, or text."""
    return {
        "a": a.id,
        "b": b.id,
        "kind": "deliveries",
        "headers": diff_headers(a.headers, b.headers),
        **diff_bodies(a.body, b.body, f"delivery {a.id}", f"delivery {b.id}"),
    }


def diff_attempts(a: Attempt, b: Attempt) -> dict[str, Any]:
    """Two attempts' responses: status, headers and body."""
    return {
        "a": a.id,
        "b": b.id,
        "kind": "attempts",
        "status": {"old": a.status, "new": b.status},
        "headers": diff_headers(a.response_headers, b.response_headers),
        **diff_bodies(a.response_body, b.response_body, f"attempt {a.id}", f"attempt {b.id}"),
    }
