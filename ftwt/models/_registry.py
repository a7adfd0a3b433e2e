"""Name-to-builder registry for the model zoo, in the style of ``torchvision.models``."""

from __future__ import annotations

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
    """Build a model by registry name, or ``torchvision:NAME`` for an untrained torchvision model.

    Args:
        name: A name from :func:`list_models`, or ``"torchvision:<name>"``.
        **kwargs: Forwarded to the builder, e.g. ``num_classes``.

    Returns:
        The freshly initialised model.

    Raises:
        ModelNotFoundError: If no builder matches ``name``.
        ConfigError: If the builder takes no argument of one of those names (``shortcut`` for a VGG).
    """
    if name.startswith(_TORCHVISION_PREFIX):
        return _get_torchvision_model(name[len(_TORCHVISION_PREFIX) :], **kwargs)
    try:
        builder = _MODELS[name]
    except KeyError:
        raise ModelNotFoundError(
            f"unknown model {name!r}; available: {', '.join(list_models())} "
            f"(or {_TORCHVISION_PREFIX}<name> for torchvision models)"
        ) from None
    try:
        return builder(**kwargs)
    except TypeError as exc:
        if "unexpected keyword argument" not in str(exc):
            raise
        arg = str(exc).rpartition("keyword argument ")[2]
        raise ConfigError(f"model {name!r} takes no argument {arg}") from None


def _get_torchvision_model(name: str, **kwargs: Any) -> nn.Module:
    # Imported lazily so the CIFAR zoo works without paying torchvision's import cost.
    import torchvision

    available = torchvision.models.list_models()
    if name not in available:
        raise ModelNotFoundError(f"unknown torchvision model {name!r}; available: {', '.join(sorted(available))}")
    # Pruning experiments start from scratch or from a user checkpoint, never from a download.
    return torchvision.models.get_model(name, weights=None, **kwargs)
