"""Name-to-builder registry for the model zoo, in the style of ``torchvision.models``."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from ftwt.errors import ConfigError, ModelNotFoundError

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_TORCHVISION_PREFIX = "torchvision:"

BuilderT = TypeVar("BuilderT", bound=Callable[..., nn.Module])


def register_model(name: str | None = None) -> Callable[[BuilderT], BuilderT]:
    """Return a decorator that registers a model builder under ``name``.

    Use as ``@register_model()`` or ``@register_model("my_net")``.

    Args:
        name: Registry key; defaults to the builder's ``__name__``.

    Returns:
        A decorator that records the builder and returns it unchanged.

    Raises:
        ValueError: If the name is already taken or uses the reserved ``torchvision:`` prefix.
    """

    def wrapper(fn: BuilderT) -> BuilderT:
        key = name if name is not None else fn.__name__
        if key.startswith(_TORCHVISION_PREFIX):
            raise ValueError(f"model name {key!r} uses the reserved prefix {_TORCHVISION_PREFIX!r}")
        if key in _MODELS:
            raise ValueError(f"a model named {key!r} is already registered")
        _MODELS[key] = fn
        return fn

    return wrapper


def list_models() -> list[str]:
    """Return the sorted names of all registered models (``torchvision:`` names excluded)."""
    return sorted(_MODELS)


def get_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a model by registry name, ``torchvision:NAME``, or the import path of your own builder.

    Args:
        name: A name from :func:`list_models`, ``"torchvision:<name>"`` (untrained), or
            ``"package.module:factory"``: a function or class of your project called with the
            keyword arguments (``num_classes`` only if it takes one).
        **kwargs: Forwarded to the builder, e.g. ``num_classes``.

    Returns:
        The freshly initialised model.

    Raises:
        ModelNotFoundError: If no builder matches ``name``.
        ConfigError: If the builder takes no argument of one of those names (``shortcut`` for a VGG).
    """
    if name.startswith(_TORCHVISION_PREFIX):
        return _get_torchvision_model(name[len(_TORCHVISION_PREFIX) :], **kwargs)
    if ":" in name:
        return _call_builder(name, _import_builder(name), kwargs)
    try:
        builder = _MODELS[name]
    except KeyError:
        raise ModelNotFoundError(
            f"unknown model {name!r}; available: {', '.join(list_models())} "
            f"(or {_TORCHVISION_PREFIX}<name> for torchvision models)"
        ) from None
    return _call_builder(name, builder, kwargs)


def _call_builder(name: str, builder: Callable[..., nn.Module], kwargs: dict[str, Any]) -> nn.Module:
    if "num_classes" in kwargs and not _takes(builder, "num_classes"):
        kwargs = {k: v for k, v in kwargs.items() if k != "num_classes"}  # a builder with its head fixed
    try:
        model = builder(**kwargs)
    except TypeError as exc:
        if "unexpected keyword argument" not in str(exc):
            raise
        arg = str(exc).rpartition("keyword argument ")[2]
        raise ConfigError(f"model {name!r} takes no argument {arg}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model {name!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _takes(fn: Callable[..., Any], arg: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == arg or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _import_builder(path: str) -> Callable[..., nn.Module]:
    """``package.module:attr`` (attr may be dotted) imported; what ``--model`` takes for your own models."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ModelNotFoundError(f"model import path {path!r} must look like package.module:factory")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # as `python -m` would: the console script does not put it there
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelNotFoundError(f"cannot import {module_name!r} for model {path!r} ({exc}); "
                                 "is its folder on PYTHONPATH (or the current folder)?") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelNotFoundError(f"module {module_name!r} has no {attr!r} (model {path!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelNotFoundError(f"model {path!r} is not callable")
    return obj


def _get_torchvision_model(name: str, **kwargs: Any) -> nn.Module:
    # Imported lazily so the CIFAR zoo works without paying torchvision's import cost.
    import torchvision

    available = torchvision.models.list_models()
    if name not in available:
        raise ModelNotFoundError(f"unknown torchvision model {name!r}; available: {', '.join(sorted(available))}")
    # Pruning experiments start from scratch or from a user checkpoint, never from a download.
    return torchvision.models.get_model(name, weights=None, **kwargs)
