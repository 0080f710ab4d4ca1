"""Reuse only what matches: a directory records the identity (config, data fingerprint) it was produced from,
and a later run that would write into it must present the same identity.

The source model (``source_model/config.json``) and the trace store (``traces/identity.json``) both go through
:func:`claim_identity`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from speculation.io import atomic_write_json


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: differences are then named by their dotted config key."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differing_keys(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """The dotted keys whose values differ (or exist on one side only)."""
    saved, wanted = flatten(saved), flatten(wanted)
    return sorted(key for key in saved.keys() | wanted.keys() if saved.get(key) != wanted.get(key))


def claim_identity(path: Path, identity: dict[str, Any], holds: str, fix: str) -> None:
    """Write ``identity`` to ``path`` if it is new, else refuse one that differs from the saved one.

    The error reads ``<directory> holds <holds> (differs in: <keys>). <fix>``.
    """
    if path.exists():
        differing = differing_keys(json.loads(path.read_text()), identity)
        if differing:
            raise ValueError(f"{path.parent} holds {holds} (differs in: {', '.join(differing)}). {fix}")
        return
    atomic_write_json(path, identity, sort_keys=True)
