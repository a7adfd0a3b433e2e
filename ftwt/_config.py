"""Dataclass configs from plain dicts (recipes, checkpoints) with a clear error on unknown keys."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

from ftwt.errors import ConfigError

T = TypeVar("T")


def config_from_dict(cls: type[T], data: dict[str, Any], what: str) -> T:
    """``cls(**data)``, refusing keys ``cls`` does not have; ``what`` names them in the message."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown {what} {unknown}; known: {', '.join(sorted(known))}")
    return cls(**data)
