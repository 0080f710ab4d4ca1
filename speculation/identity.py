"""Reuse only what matches: a directory records the identity (config, data fingerprint) it was produced from,
and a later run that would write into it must present the same identity.

The source model (``source_model/config.json``), the trace store (``traces/identity.json``) and every predictor
run (``predictors/<run>/identity.json``) go through :func:`claim_identity`. :func:`json_sha256` and
:func:`files_sha256` are the content digests identities are made of.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from speculation.errors import UserError
from speculation.io import atomic_write_json, file_sha256


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


def claim_identity(
    path: Path, identity: dict[str, Any], holds: str, fix: str, defaults: dict[str, Any] | None = None
) -> None:
    """Write ``identity`` to ``path`` if it is new, else refuse one that differs from the saved one.

    ``defaults`` (dotted keys): a key the saved identity lacks still matches when the wanted value is its default,
    so an option added later (whose default keeps the old behaviour) does not invalidate what was made before it.
    The error reads ``<directory> holds <holds> (differs in: <keys>). <fix>``.
    """
    if path.exists():
        saved, wanted, defaults = flatten(json.loads(path.read_text())), flatten(identity), flatten(defaults or {})
        differing = [
            key for key in differing_keys(saved, wanted)
            if key in saved or key not in defaults or wanted.get(key) != defaults[key]
        ]  # fmt: skip
        if differing:
            raise UserError(f"{path.parent} holds {holds} (differs in: {', '.join(differing)}). {fix}")
        return
    atomic_write_json(path, identity, sort_keys=True)


def json_sha256(payload: Any) -> str:
    """The sha256 of ``payload`` as canonical JSON (sorted keys): equal content, equal digest."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def files_sha256(paths: Iterable[Path], root: Path) -> str:
    """One digest of several files' contents and their names relative to ``root``."""
    return json_sha256(sorted((Path(p).relative_to(root).as_posix(), file_sha256(p)) for p in paths))
