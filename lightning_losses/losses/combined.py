"""``CombinedLoss`` (``combined``) and ``CompositeLoss``, the base of losses made of other losses."""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_losses.binding import Binding
from lightning_losses.protocol import LossFunction, LossOutput, LossType, local_mean_share, split_output
from lightning_losses.registry import available_losses, build_loss, get_loss, register_loss

__all__ = ["CombinedLoss", "CompositeLoss", "LossSpec", "build_components"]

LossSpec = str | dict[str, Any] | nn.Module
"""A loss as a config gives it: a registry name, ``{name, params}``, ``{class_path, init_args}`` or a module.

A dict may also hold ``input_map`` (the component's parameter name → input name)."""

COUNT_NAMES = ("global_valid_toks", "global_valid_seqs")
_MASK_KEY_OF_COUNT = {
    "global_valid_toks": ("token_mask_key", "token_mask"),
    "global_valid_seqs": ("sample_mask_key", "sample_mask"),
}
_SPEC_KEYS = ({"name", "params"}, {"class_path", "init_args", "dict_kwargs"})


def _snake_case(name: str) -> str:
    """A class name as a component name: ``"MSELoss"`` → ``"mse"``, ``"SmoothL1Loss"`` → ``"smooth_l1"``."""
    if name.endswith("Loss") and len(name) > len("Loss"):
        name = name[: -len("Loss")]
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()


def _registered_name(loss_class: type) -> str | None:
    for name in available_losses():
        if get_loss(name) is loss_class:
            return name
    return None


def _default_name(spec: Any, module: nn.Module) -> str:
    """A component's name in a list: its registry name, else its class name in snake case."""
    if isinstance(spec, str) and "." not in spec:
        return spec
    if isinstance(spec, Mapping) and "name" in spec:
        return str(spec["name"])
    return _registered_name(type(module)) or _snake_case(type(module).__name__)


def _looks_like_one_spec(specs: Mapping[str, Any]) -> bool:
    keys = set(specs) - {"input_map"}
    return any(
        keys and keys <= allowed and ("name" in keys or "class_path" in keys) for allowed in _SPEC_KEYS
    )


def build_components(
    specs: Sequence[LossSpec] | Mapping[str, LossSpec],
    argument: str,
    input_maps: Mapping[str, Mapping[str, str]] | None = None,
) -> tuple[dict[str, nn.Module], dict[str, dict[str, str]]]:
    """Named component losses and their input maps, from a list or a ``{name: spec}`` mapping.

    In a list a component is named by its registry name (``"cross_entropy"``) or, for a class path or a
    module of an unregistered class, its class name in snake case without ``Loss`` (``torch.nn.MSELoss``:
    ``"mse"``); repeated names get ``_2``, ``_3``.
    A spec dict may carry its ``input_map``; ``input_maps`` gives them by component name.

    >>> components, maps = build_components(["mse", {"name": "mse", "input_map": {"preds": "p"}}], "losses")
    >>> list(components), maps
    (['mse', 'mse_2'], {'mse_2': {'preds': 'p'}})
    """
    if isinstance(specs, (str, nn.Module)) or (isinstance(specs, Mapping) and _looks_like_one_spec(specs)):
        raise ValueError(
            f"`{argument}` must be a list of loss specs or a mapping of names to specs, got a single "
            f"spec {specs!r}; wrap it in a list"
        )
    if isinstance(specs, Mapping):
        items = [(name, spec) for name, spec in specs.items()]
        for name, _ in items:
            if not isinstance(name, str) or not name or "." in name:
                raise ValueError(f"`{argument}` names must be non-empty strings without '.', got {name!r}")
    elif isinstance(specs, Sequence):
        items = [(None, spec) for spec in specs]
    else:
        raise TypeError(f"`{argument}` must be a list or a mapping of loss specs, got {type(specs).__name__}")
    if not items:
        raise ValueError(f"`{argument}` must hold at least one loss")

    components: dict[str, nn.Module] = {}
    maps: dict[str, dict[str, str]] = {}
    for given_name, spec in items:
        inline_map = None
        if isinstance(spec, Mapping) and "input_map" in spec:
            spec = dict(spec)
            inline_map = dict(spec.pop("input_map") or {})
        module = build_loss(spec)
        name = given_name or _default_name(spec, module)
        if given_name is None and name in components:
            suffix = 2
            while f"{name}_{suffix}" in components:
                suffix += 1
            name = f"{name}_{suffix}"
        components[name] = module
        if inline_map:
            maps[name] = inline_map
    for name, rename in (input_maps or {}).items():
        if name not in components:
            raise ValueError(f"`input_maps` names the loss {name!r}; the losses are {list(components)}")
        if name in maps:
            raise ValueError(f"the input map of {name!r} is given twice: in its spec and in `input_maps`")
        maps[name] = dict(rename)
    return components, maps


def _world_size() -> int:
    """From torch.distributed, not ``trainer.world_size`` as in LossModule: a loss has no trainer."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


class CompositeLoss(LossFunction):
    """Base of losses that call other losses (``CombinedLoss``, ``MultiTaskLoss``).

    The components are registered submodules (an ``nn.ModuleDict``), so their parameters and buffers
    train, move and checkpoint with the composite. ``forward(**inputs)`` takes the union of the
    components' input names (after each one's rename map); :meth:`forward_signature` declares it, so
    ``LossModule`` resolves every input by name. A name is required if any component requires it.

    Global counts: the components that take ``global_valid_toks`` (``global_valid_seqs``) get it when
    their token (sample) mask comes from the same batch key as the first such component's, which
    becomes this loss's ``token_mask_key`` (``sample_mask_key``). Given a count, ``LossModule`` multiplies
    the loss by the world size (see its docstring); so the terms of components that average over their
    own inputs (and, in ``MultiTaskLoss``, the log-variance terms) are divided by it here, and the
    gradient after DDP's average is exactly the one-process gradient. A caller other than
    ``LossModule`` that passes global counts under ``torch.distributed`` must scale the loss by the world
    size as well (as NeMo RL does).
    """

    def __init__(
        self,
        components: Mapping[str, nn.Module],
        input_maps: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        super().__init__()
        input_maps = input_maps or {}
        self.components = nn.ModuleDict()
        for name, module in components.items():
            try:
                self.components[name] = module
            except KeyError as error:  # a name that is an attribute of nn.ModuleDict ("type", "to", ...)
                raise ValueError(f"{name!r} cannot name a loss: {error}") from error
        self.input_maps = {name: dict(rename) for name, rename in input_maps.items()}
        self.bindings: dict[str, Binding] = {}
        for name, module in self.components.items():
            try:
                self.bindings[name] = Binding(module, self.input_maps.get(name))
            except ValueError as error:
                raise ValueError(f"the input map of {name!r}: {error}") from error
        self.count_receivers = self._assign_counts()
        self.loss_type = (
            LossType.TOKEN_LEVEL
            if self.count_receivers["global_valid_toks"]
            else LossType.SEQUENCE_LEVEL
            if self.count_receivers["global_valid_seqs"]
            else None
        )
        self._signature = self._build_signature()

    # -- inputs ------------------------------------------------------------------------------------

    def _assign_counts(self) -> dict[str, frozenset[str]]:
        receivers: dict[str, frozenset[str]] = {}
        for count, (attribute, default) in _MASK_KEY_OF_COUNT.items():
            takers = [n for n, b in self.bindings.items() if count in b.names and count not in b.rename]
            mask_keys = {
                n: self.bindings[n].source_key(getattr(self.components[n], attribute, default))
                for n in takers
            }
            chosen = mask_keys[takers[0]] if takers else default
            setattr(self, attribute, chosen)
            for name in takers:
                if mask_keys[name] != chosen and count in self.bindings[name].required:
                    raise ValueError(
                        f"the loss {name!r} requires `{count}` counted from the batch key "
                        f"'{mask_keys[name]}', but {takers[0]!r} counts it from '{chosen}'; one count "
                        "serves all components: rename their masks to the same key"
                    )
            receivers[count] = frozenset(n for n in takers if mask_keys[n] == chosen)
        return receivers

    def extra_parameters(self) -> list[inspect.Parameter]:
        """Inputs of the composite itself, besides its components' (e.g. ``task_ids``)."""
        return []

    def _build_signature(self) -> inspect.Signature:
        required: dict[str, bool] = {}
        annotations: dict[str, Any] = {}
        for name, binding in self.bindings.items():
            for param in binding.parameters:
                if (
                    param.name in COUNT_NAMES
                    and param.name not in binding.rename
                    and name not in self.count_receivers[param.name]
                ):
                    continue  # a count it will not be given: see _assign_counts
                key = binding.source_key(param.name)
                required[key] = required.get(key, False) or param.default is inspect.Parameter.empty
                annotations.setdefault(key, param.annotation)
        empty = inspect.Parameter.empty
        params = [
            inspect.Parameter(
                key,
                inspect.Parameter.KEYWORD_ONLY,
                default=empty if is_required else None,
                annotation=annotations[key],
            )
            for key, is_required in required.items()
        ]
        params += [p for p in self.extra_parameters() if p.name not in required]
        return inspect.Signature(params)

    def forward_signature(self) -> inspect.Signature:
        """The inputs ``forward(**inputs)`` takes: the union of the components' (renamed) inputs."""
        return self._signature

    def check_inputs(self, inputs: Mapping[str, Any]) -> None:
        """``TypeError`` for inputs not in :meth:`forward_signature` or required ones missing."""
        params = self._signature.parameters
        unknown = sorted(set(inputs) - set(params))
        missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in inputs]
        if unknown or missing:
            problem = f"unexpected inputs {unknown}" if unknown else f"missing required inputs {missing}"
            raise TypeError(f"{type(self).__name__} got {problem}; its inputs are {list(params)}")

    def counted_scale(self, inputs: Mapping[str, Any]) -> float:
        """What the caller multiplies this call's loss by when it passed a global count, else 1.

        That is the world size (``LossModule`` scales a globally normalized loss by it, see its
        docstring) over the micro-batch's share of the loaded batch (:func:`micro_batch_share`): a
        local mean divided by it is its exact share of the global batch's mean.
        """
        if not any(inputs.get(count) is not None for count in COUNT_NAMES):
            return 1
        return _world_size() / local_mean_share()

    def component_inputs(
        self, name: str, inputs: Mapping[str, Any], with_counts: bool = True, missing_ok: bool = False
    ) -> tuple[list[Any], dict[str, Any], bool]:
        """The arguments of component ``name`` and whether it was given a global count (``missing_ok``:
        leave out required inputs that are not there, see :meth:`Binding.bind`)."""
        binding = self.bindings[name]
        source = dict(inputs)
        for count in COUNT_NAMES:
            if count not in binding.rename and (not with_counts or name not in self.count_receivers[count]):
                source.pop(count, None)
        args, kwargs = binding.bind(
            [source], source_names=(f"the inputs of {type(self).__name__}",), missing_ok=missing_ok
        )
        counted = any(kwargs.get(c) is not None for c in COUNT_NAMES if c not in binding.rename)
        return args, kwargs, counted

    # -- components --------------------------------------------------------------------------------

    def run_component(
        self, name: str, args: list[Any], kwargs: dict[str, Any]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Call component ``name``; its loss (0-dim) and its metrics prefixed with ``<name>_``.

        A ``ValueError`` / ``TypeError`` of the component is raised again (the same type, chained) with
        the component's name and its renamed inputs in front, since its message names the component's
        own parameter (``mask``), not the input it was given (``reg_mask``).
        """
        try:
            output = self.components[name](*args, **kwargs)
        except (ValueError, TypeError) as error:
            rename = self.bindings[name].rename
            renamed = f" (its inputs renamed: {rename})" if rename else ""
            raise type(error)(
                f"the loss {name!r} ({type(self.components[name]).__name__}){renamed}: {error}"
            ) from error
        loss, metrics = split_output(output)
        if loss.ndim != 0:
            raise ValueError(
                f"the loss {name!r} ({type(self.components[name]).__name__}) returned a loss of shape "
                f"{tuple(loss.shape)}; it must be a scalar (use reduction='mean' or 'sum')"
            )
        prefixed = {f"{name}_{key}": value for key, value in metrics.items() if key != "loss"}
        prefixed[f"{name}_loss"] = loss.detach()
        return loss, prefixed

    def component_partial_metrics(self, name: str) -> list[str]:
        """Metric keys of a count-receiving component that are shares of a global value."""
        if not any(name in receivers for receivers in self.count_receivers.values()):
            return []
        own = getattr(self.components[name], "partial_metrics", ())
        return [f"{name}_loss", *(f"{name}_{key}" for key in own if key != "loss")]

    def local_metrics(self, metrics: dict[str, Tensor], scale: float) -> dict[str, Tensor]:
        """Divide by ``scale`` (:meth:`counted_scale`) those of one component's ``metrics`` listed in
        ``partial_metrics`` when this call left them local (the component got no count), so that
        ``LossModule``'s scaling of partial metrics leaves them as they are."""
        if scale == 1:
            return metrics
        partial = set(self.partial_metrics)
        return {key: value / scale if key in partial else value for key, value in metrics.items()}


@register_loss("combined")
class CombinedLoss(CompositeLoss):
    r"""A weighted sum of losses: :math:`L = \sum_c w_c L_c`.

    Each component is a registry name, a ``{name, params}`` or ``{class_path, init_args}`` dict, or a
    module (the guide's schema: ``{"name": "combined", "params": {"loss_functions": [...],
    "loss_weights": [...]}}``); unknown names raise a ``ValueError`` listing the known ones. Each gets its
    inputs by the names of its own ``forward`` parameters, renamed per component by ``input_maps``
    (``{component: {parameter: input name}}``) or an ``input_map`` in its spec dict. Global counts and
    DDP: see :class:`CompositeLoss`.

    Args:
        loss_functions: a list of specs (components named by registry name, else by class name:
            ``torch.nn.SmoothL1Loss`` is ``smooth_l1``; repeats suffixed ``_2``...) or a mapping
            ``{name: spec}``.
        loss_weights: :math:`w_c`, a list in component order or a mapping by name (1 for a name left
            out); all 1 by default.
        input_maps: per component name, its parameter name → input name.

    Metrics: ``loss`` and ``total_loss`` (:math:`L`); per component ``<name>_loss`` (:math:`L_c`),
    ``<name>_weighted_loss`` (:math:`w_c L_c`) and its other metrics as ``<name>_<key>``.

    >>> loss_fn = CombinedLoss(["cross_entropy", "mse"], loss_weights=[0.75, 0.25],
    ...                        input_maps={"mse": {"preds": "logits", "target": "soft_target"}})
    >>> list(loss_fn.forward_signature().parameters)
    ['logits', 'target', 'mask', 'global_valid_toks', 'soft_target']
    >>> logits, soft_target = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.0]])
    >>> loss, metrics = loss_fn(logits=logits, target=torch.tensor([0]), soft_target=soft_target)
    >>> round(metrics["cross_entropy_loss"].item(), 4), metrics["mse_loss"].item()  # ((2 - 1)² + 0²) / 2
    (0.1269, 0.5)
    >>> round(loss.item(), 4), round(metrics["mse_weighted_loss"].item(), 4)  # 0.75 * 0.1269 + 0.25 * 0.5
    (0.2202, 0.125)
    """

    def __init__(
        self,
        loss_functions: Sequence[LossSpec] | Mapping[str, LossSpec],
        loss_weights: Sequence[float] | Mapping[str, float] | None = None,
        input_maps: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        components, maps = build_components(loss_functions, "loss_functions", input_maps)
        super().__init__(components, maps)
        names = list(self.components)
        if loss_weights is None:
            weights = dict.fromkeys(names, 1.0)
        elif isinstance(loss_weights, Mapping):
            unknown = sorted(set(loss_weights) - set(names))
            if unknown:
                raise ValueError(f"`loss_weights` names {unknown}, which are not among the losses {names}")
            weights = {name: float(loss_weights.get(name, 1.0)) for name in names}
        else:
            if len(loss_weights) != len(names):
                raise ValueError(
                    f"`loss_weights` must have one weight per loss ({len(names)}: {names}), "
                    f"got {len(loss_weights)}: {list(loss_weights)}"
                )
            weights = {name: float(w) for name, w in zip(names, loss_weights, strict=True)}
        self.loss_weights = weights
        partial = ["total_loss"]
        for name in names:
            component = self.component_partial_metrics(name)
            partial += component + ([f"{name}_weighted_loss"] if component else [])
        self.partial_metrics = tuple(partial)

    def valid_tokens(self, inputs: Mapping[str, Any]) -> Tensor | None:
        """What the first component given ``global_valid_toks`` averages over (its ``valid_tokens``).

        One count serves every component that takes it, so they must average over the same tokens: the
        same mask, and the same targets and ``ignore_index`` (as the guide's cross_entropy + focal +
        kl_divergence do).
        """
        for name in self.components:
            hook = getattr(self.components[name], "valid_tokens", None)
            if name in self.count_receivers["global_valid_toks"] and callable(hook):
                # counts may be taken before the model ran (micro-batches): outputs may be missing
                _, kwargs, _ = self.component_inputs(name, inputs, with_counts=False, missing_ok=True)
                return hook(kwargs)
        return None

    def forward(self, **inputs: Any) -> LossOutput:
        self.check_inputs(inputs)
        scale = self.counted_scale(inputs)
        total: Tensor | None = None
        metrics: dict[str, Tensor] = {}
        for name in self.components:
            args, kwargs, counted = self.component_inputs(name, inputs)
            loss, component_metrics = self.run_component(name, args, kwargs)
            weighted = self.loss_weights[name] * loss
            component_metrics[f"{name}_weighted_loss"] = weighted.detach()
            if not counted and scale != 1:  # a local mean: its share, as LossModule multiplies by world_size
                weighted = weighted / scale
                component_metrics = self.local_metrics(component_metrics, scale)
            total = weighted if total is None else total + weighted
            metrics |= component_metrics
        assert total is not None  # at least one component
        metrics["loss"] = metrics["total_loss"] = total.detach()
        return LossOutput(total, metrics)
