"""Short names for losses: ``register_loss``, ``build_loss`` and the ``lightning_losses.losses`` entry points.

``build_loss`` accepts every form a config may hold:

- a registry name: ``"focal"``;
- the guide's schema: ``{"name": "focal", "params": {"gamma": 2.0}}``;
- LightningCLI's: ``{"class_path": "lightning_losses.losses.FocalLoss", "init_args": {...}}``;
- a dotted class path: ``"torch.nn.MSELoss"``;
- an ``nn.Module``, returned as it is.

Another installed package adds names through the entry-point group ``lightning_losses.losses``
(``name = "package.module:LossClass"`` in its ``pyproject.toml``).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from typing import Any, TypeVar

from torch import nn

__all__ = ["available_losses", "build_loss", "get_loss", "register_loss"]

ENTRY_POINT_GROUP = "lightning_losses.losses"
LossFactory = Callable[..., nn.Module]
F = TypeVar("F", bound=LossFactory)

_REGISTRY: dict[str, LossFactory] = {}
_loaded = {"builtins": False, "entry_points": False}


def register_loss(name: str) -> Callable[[F], F]:
    """Class decorator: make a loss buildable by ``name``.

    >>> @register_loss("doc_example_l1")
    ... class L1(nn.Module):
    ...     def forward(self, preds, target):
    ...         return (preds - target).abs().mean()
    >>> type(build_loss("doc_example_l1")).__name__
    'L1'
    """

    def decorator(factory: F) -> F:
        known = _REGISTRY.get(name)
        if known is not None and _qualified_name(known) != _qualified_name(factory):
            raise ValueError(f"the loss name '{name}' is taken by {_qualified_name(known)}")
        _REGISTRY[name] = factory
        return factory

    return decorator


def _qualified_name(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def _load_builtins() -> None:
    if not _loaded["builtins"]:
        _loaded["builtins"] = True
        importlib.import_module("lightning_losses.losses")


def _load_entry_points() -> None:
    if _loaded["entry_points"]:
        return
    _loaded["entry_points"] = True
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name not in _REGISTRY:
            register_loss(entry.name)(entry.load())


def available_losses() -> list[str]:
    """All registered names: the library's and those of installed packages' entry points."""
    _load_builtins()
    _load_entry_points()
    return sorted(_REGISTRY)


def get_loss(name: str) -> LossFactory:
    """The class (or factory) registered as ``name``; a ``ValueError`` lists the known names."""
    _load_builtins()
    if name not in _REGISTRY:
        _load_entry_points()
    if name not in _REGISTRY:
        raise ValueError(f"unknown loss name {name!r}; known losses: {', '.join(available_losses())}")
    return _REGISTRY[name]


def _import_class_path(path: str) -> LossFactory:
    module_name, _, attribute = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"cannot import the loss class_path {path!r}: {error}") from error


def build_loss(spec: str | Mapping[str, Any] | nn.Module, **overrides: Any) -> nn.Module:
    """A loss module from a name, a ``{name, params}`` or ``{class_path, init_args}`` dict, or a module.

    ``overrides`` are keyword arguments added to the spec's own.

    >>> build_loss({"class_path": "torch.nn.SmoothL1Loss", "init_args": {"beta": 0.5}}).beta
    0.5
    """
    if isinstance(spec, nn.Module):
        if overrides:
            raise ValueError(f"cannot apply {sorted(overrides)} to an already built {type(spec).__name__}")
        return spec
    if isinstance(spec, str):
        factory = _import_class_path(spec) if "." in spec and spec not in _REGISTRY else get_loss(spec)
        return _instantiate(factory, dict(overrides), spec)
    if isinstance(spec, Mapping):
        if "class_path" in spec:
            unknown = set(spec) - {"class_path", "init_args", "dict_kwargs"}
            factory, kwargs, label = (
                _import_class_path(spec["class_path"]),
                dict(spec.get("init_args") or {}),
                spec["class_path"],
            )
        elif "name" in spec:
            unknown = set(spec) - {"name", "params"}
            factory, kwargs, label = get_loss(spec["name"]), dict(spec.get("params") or {}), spec["name"]
        else:
            raise ValueError(
                "a loss spec dict needs 'name' (with optional 'params') or 'class_path' (with optional "
                f"'init_args'), got keys {sorted(spec)}"
            )
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)} in the loss spec for {label!r}")
        return _instantiate(factory, kwargs | overrides, label)
    raise TypeError(f"a loss spec must be a name, a dict or an nn.Module, got {type(spec).__name__}")


def _accepted_parameters(factory: LossFactory) -> list[str] | None:
    """The keyword parameters ``factory`` takes, or None when it takes any (``**kwargs``) or cannot tell."""
    if isinstance(factory, type) and factory.__init__ is nn.Module.__init__:
        return []  # a module class without its own __init__ (torch's signature is *args, **kwargs)
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in parameters if p.kind in keyword]


def _instantiate(factory: LossFactory, kwargs: dict[str, Any], label: str) -> nn.Module:
    accepted = _accepted_parameters(factory)
    unknown = [] if accepted is None else sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"cannot build the loss {label!r} with parameters {sorted(kwargs)}: unknown parameter(s) "
            f"{unknown}; its parameters are {accepted}"
        )
    try:
        loss = factory(**kwargs)
    except TypeError as error:
        raise ValueError(
            f"cannot build the loss {label!r} with parameters {sorted(kwargs)}: {error}"
        ) from error
    if not isinstance(loss, nn.Module):
        raise TypeError(f"the loss {label!r} built a {type(loss).__name__}, not an nn.Module")
    return loss
