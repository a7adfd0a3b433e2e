"""Recipes: YAML files of :class:`~ftwt.train.TrainConfig` keys, shipped in ``ftwt/recipes``."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ftwt.errors import ConfigError


def list_recipes() -> list[str]:
    """Names of the recipes shipped in ``ftwt/recipes``."""
    folder = resources.files("ftwt") / "recipes"
    if not folder.is_dir():
        return []
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """Read a recipe: a YAML file path, or the bare name of a shipped recipe.

    Returns the raw dict; :meth:`TrainConfig.from_dict` checks its keys.

    Raises:
        ConfigError: no such file or recipe, unreadable YAML, or not a mapping.
    """
    path = Path(name_or_path)
    if path.is_file():
        text, where = path.read_text(), str(path)
    else:
        # `recipes/NAME.yaml` (as the README writes it) names a shipped recipe too.
        shipped = resources.files("ftwt") / "recipes" / f"{path.name.removesuffix('.yaml')}.yaml"
        if not shipped.is_file():
            raise ConfigError(f"no recipe file or shipped recipe named {name_or_path!r}; shipped: {', '.join(list_recipes())}")
        text, where = shipped.read_text(), f"recipe {path.stem}"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{where} is not valid YAML: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of config keys, got {type(data).__name__}")
    return data


__all__ = ["list_recipes", "load_recipe"]
