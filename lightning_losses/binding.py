"""Resolve the arguments of a model or a loss by the names of its parameters.

The rule ``LossModule`` documents: each parameter of ``forward`` (of ``__call__`` when a class overrides
it, as the guide's protocol does) is looked up under ``rename.get(name, name)`` among the sources, in
order (model outputs before the batch). Parameters with a default may be missing; required ones may
not: the error names the parameter, the callee and every key that was available.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

__all__ = ["Binding", "callable_signature"]

_SKIPPED_KINDS = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def callable_signature(module: nn.Module) -> inspect.Signature:
    """The signature that calling ``module(...)`` really has.

    A module whose inputs depend on its configuration (a combination of losses whose ``forward`` takes
    ``**inputs``) declares them with a ``forward_signature()`` method; otherwise ``__call__``'s when a
    class overrides it (the guide's protocol), else ``forward``'s.
    """
    declared = getattr(module, "forward_signature", None)
    if callable(declared):
        return declared()
    call_overridden = type(module).__call__ is not nn.Module.__call__
    fn: Callable[..., Any] = module.__call__ if call_overridden else module.forward
    return inspect.signature(fn)


class Binding:
    """The parameters of a callable and how to fill them by name.

    >>> import torch
    >>> binding = Binding(torch.nn.MSELoss(), rename={"input": "preds"})
    >>> args, kwargs = binding.bind([{"preds": torch.zeros(2)}, {"target": torch.ones(2)}])
    >>> sorted(kwargs)
    ['input', 'target']
    """

    def __init__(self, module: nn.Module, rename: Mapping[str, str] | None = None) -> None:
        self.name = type(module).__name__
        self.rename = dict(rename or {})
        params = [p for p in callable_signature(module).parameters.values() if p.kind not in _SKIPPED_KINDS]
        self.parameters = params
        unknown = set(self.rename) - {p.name for p in params}
        if unknown:
            raise ValueError(
                f"the rename map names {sorted(unknown)}, which are not parameters of "
                f"{self.name}; its parameters are {[p.name for p in params]}"
            )
        self.names = [p.name for p in params]
        self.required = [p.name for p in params if p.default is inspect.Parameter.empty]
        # what `bind` needs of each parameter, worked out once: it runs every training step
        self._plan = [
            (
                p.name,
                self.source_key(p.name),
                p.name in self.rename,
                p.kind is inspect.Parameter.POSITIONAL_ONLY,
                p.default is not inspect.Parameter.empty,
            )
            for p in params
        ]

    def source_key(self, name: str) -> str:
        return self.rename.get(name, name)

    def bind(
        self,
        sources: list[Mapping[str, Any]],
        special: Mapping[str, Any] | None = None,
        source_names: tuple[str, ...] = ("model outputs", "batch"),
        missing_ok: bool = False,
    ) -> tuple[list[Any], dict[str, Any]]:
        """Positional-only values and keyword values for a call, looked up by name.

        ``special`` maps parameter names to values that take precedence over the sources (``data``,
        ``model``, global counts), unless the rename map names the parameter. ``missing_ok``: leave out
        required parameters that are not found instead of raising (to inspect what is available).
        """
        special = special or {}
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        for name, key, renamed, positional, optional in self._plan:
            if name in special and not renamed:
                value = special[name]
            else:
                for source in sources:
                    if key in source:
                        value = source[key]
                        break
                else:
                    if missing_ok or optional:
                        continue
                    raise self.missing_error(name, sources, source_names, special)
            if positional:
                args.append(value)
            else:
                kwargs[name] = value
        return args, kwargs

    def missing_error(
        self,
        name: str,
        sources: list[Mapping[str, Any]],
        source_names: tuple[str, ...],
        special: Mapping[str, Any],
    ) -> ValueError:
        key = self.source_key(name)
        looked_up = f"'{key}'" if key == name else f"'{key}' (renamed from '{name}')"
        available = "; ".join(
            f"{label} have keys {sorted(map(str, source))}"
            for label, source in zip(source_names, sources, strict=False)
        )
        specials = f"; special names are {sorted(special)}" if special else ""
        return ValueError(
            f"{self.name} needs the input `{name}`, looked up as {looked_up}, but it was not found: "
            f"{available}{specials}. Map it to an available key, e.g. {{'{name}': '<key>'}} in the "
            "rename map (`input_map` for a loss, `model_input_map` for a model)."
        )
