"""The loss protocol: ``LossType``, ``LossOutput``, ``LossFunction`` and shared input checks.

A loss is an ``nn.Module`` whose ``forward`` returns ``LossOutput(loss, metrics)``: a 0-dim loss tensor
and a dict of **detached 0-dim tensors** to log. A loss whose ``loss_type`` is ``TOKEN_LEVEL`` or
``SEQUENCE_LEVEL`` divides a *sum* by ``global_valid_toks`` / ``global_valid_seqs`` (the counts of the
whole global batch, over micro-batches and data-parallel ranks), so that the partial losses of the
pieces add up to the loss of the whole batch.

The checks here raise ``ValueError``/``TypeError`` naming the argument and what was seen. Shape and dtype
checks cost nothing. Checks that read values (target range, NaN/inf) would be a host-device sync on an
accelerator, so by default they run only on CPU tensors; ``set_value_checks("always" | "never")``
changes that globally.
"""

from __future__ import annotations

import contextlib
import enum
import functools
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

__all__ = [
    "LossFunction",
    "LossOutput",
    "LossType",
    "check_class_targets",
    "check_finite",
    "check_floating",
    "check_mask",
    "check_ndim",
    "check_positive",
    "check_same_leading_dims",
    "check_same_shape",
    "compute_dtype",
    "local_mean_share",
    "micro_batch_share",
    "set_value_checks",
    "value_checks_enabled",
    "without_autocast",
]


class LossType(str, enum.Enum):
    """How a loss is normalized over the global batch (NeMo RL's convention).

    ``TOKEN_LEVEL``: a sum over valid tokens divided by ``global_valid_toks``.
    ``SEQUENCE_LEVEL``: a sum over valid sequences divided by ``global_valid_seqs``.
    """

    TOKEN_LEVEL = "token_level"
    SEQUENCE_LEVEL = "sequence_level"


class LossOutput(NamedTuple):
    """What a loss returns: ``loss, metrics = loss_fn(...)`` unpacks it.

    ``loss`` is a 0-dim tensor to backpropagate; ``metrics`` maps names to detached 0-dim tensors.
    """

    loss: Tensor
    metrics: dict[str, Tensor]


def _ensure_module_initialized(init):
    """Wrap a subclass ``__init__`` so that ``nn.Module.__init__`` has run before its body.

    This lets the guide's protocol be written verbatim: ``def __init__(self, config): self.alpha = ...``
    without ``super().__init__()``.
    """

    @functools.wraps(init)
    def wrapped(self, *args: Any, **kwargs: Any) -> None:
        if "_parameters" not in self.__dict__:
            nn.Module.__init__(self)
        init(self, *args, **kwargs)

    return wrapped


class LossFunction(nn.Module):
    """Base class of every loss: an ``nn.Module`` with a ``loss_type``.

    Class attributes a subclass may set:

    - ``loss_type``: ``LossType.TOKEN_LEVEL``, ``LossType.SEQUENCE_LEVEL`` or ``None`` (a loss that
      averages over its own inputs, like ``torch.nn.MSELoss``).
    - ``token_mask_key`` / ``sample_mask_key``: the batch keys ``LossModule`` counts to compute
      ``global_valid_toks`` / ``global_valid_seqs``.
    - ``partial_metrics``: metric keys that, like the loss itself, are divided by a global count and so
      are *partial sums* on one rank; they are summed over ranks when logged. The ``loss`` key of a
      token/sequence-level loss always is.

    and methods: ``valid_tokens(inputs)`` (below), when its denominator is not just the token mask, and
    ``loss_only(...)``, when the loss alone costs fewer ops than the loss with its metrics.

    ``forward`` may be written as the guide's protocol (also as ``__call__``, without calling
    ``super().__init__()``)::

        >>> import torch
        >>> class SumOfSquares(LossFunction):
        ...     def __init__(self, config):
        ...         self.scale = config.get("scale", 1.0)
        ...         self.loss_type = LossType.TOKEN_LEVEL
        ...     def __call__(self, next_token_logits, data, global_valid_seqs, global_valid_toks):
        ...         per_token = next_token_logits.pow(2).sum(-1) * data["token_mask"]
        ...         loss = self.scale * per_token.sum() / global_valid_toks
        ...         return loss, {"loss": loss.detach()}
        >>> fn = SumOfSquares({"scale": 2.0})
        >>> logits = torch.ones(2, 3, 4)
        >>> fn(logits, {"token_mask": torch.ones(2, 3)}, torch.tensor(2), torch.tensor(6))[0]
        tensor(8.)
    """

    loss_type: LossType | None = None
    token_mask_key: str = "token_mask"
    sample_mask_key: str = "sample_mask"
    partial_metrics: tuple[str, ...] = ()

    def valid_tokens(self, inputs: Mapping[str, Any]) -> Tensor | None:
        """The weights of the elements this loss averages over, given the inputs it is about to receive.

        ``LossModule`` sums them (over ranks) into ``global_valid_toks``, so the count is exactly the
        loss's own denominator: a loss that also skips ``ignore_index`` targets says so here. ``None``
        (the default): count ``batch[token_mask_key]``.
        """
        return None

    def loss_only(self, *args: Any, **kwargs: Any) -> Tensor:
        """The loss of ``self(*args, **kwargs)`` without its metrics, for callers that use the value alone
        (``AdversarialLoss``: its attack's objective and its two terms). By default the call's loss; a loss
        whose metrics cost ops of their own (``cross_entropy``'s accuracy) computes the loss alone."""
        return split_output(self(*args, **kwargs)).loss

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _ensure_module_initialized(cls.__dict__["__init__"])


# ----------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------

_MICRO_BATCH_SHARE: ContextVar[float] = ContextVar("micro_batch_share", default=1.0)


@contextlib.contextmanager
def micro_batch_share(share: float) -> Iterator[None]:
    """Declare that the calls inside hold ``share`` of the loaded batch's rows (a micro-batch).

    ``LossModule(micro_batch_size=...)`` sets it around each micro-batch's loss. A loss that mixes
    globally normalized terms with *local means* (``CombinedLoss``, ``MultiTaskLoss``) weighs its local
    means by it, so that the micro-batches' gradients add up to the loaded batch's.

    >>> with micro_batch_share(0.25):
    ...     local_mean_share()
    0.25
    >>> local_mean_share()
    1.0
    """
    if not 0.0 < share <= 1.0:
        raise ValueError(f"`share` must be in (0, 1], got {share}")
    token = _MICRO_BATCH_SHARE.set(share)
    try:
        yield
    finally:
        _MICRO_BATCH_SHARE.reset(token)


def local_mean_share() -> float:
    """The share of the loaded batch the current call holds (1.0 outside :func:`micro_batch_share`)."""
    return _MICRO_BATCH_SHARE.get()


_VALUE_CHECKS: Literal["auto", "always", "never"] = "auto"


def set_value_checks(mode: Literal["auto", "always", "never"]) -> None:
    """Choose when checks that read tensor values run.

    ``"auto"`` (default): only for CPU tensors, where they cost no host-device sync.
    ``"always"``: also on accelerators (one sync per check: for debugging).
    ``"never"``: skip them (shape and dtype checks still run).
    """
    global _VALUE_CHECKS
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"`mode` must be 'auto', 'always' or 'never', got {mode!r}")
    _VALUE_CHECKS = mode


def value_checks_enabled(tensor: Tensor) -> bool:
    """Whether a value-reading check should run on ``tensor`` under the current mode."""
    if _VALUE_CHECKS == "never" or torch.compiler.is_compiling():
        return False
    return _VALUE_CHECKS == "always" or tensor.device.type == "cpu"


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype a loss computes in: float64 if any input is float64, else float32 (bf16/fp16 inputs
    are upcast, DESIGN's rule).

    >>> compute_dtype(torch.zeros(1, dtype=torch.bfloat16))
    torch.float32
    >>> compute_dtype(torch.zeros(1), torch.zeros(1, dtype=torch.float64))
    torch.float64
    """
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def without_autocast(tensor: Tensor) -> contextlib.AbstractContextManager[Any]:
    """Autocast switched off on ``tensor``'s device, so a loss's matrix products run in its compute
    dtype: a bf16 Gram matrix, for one, leaves nothing of the distances it is meant to give.

    >>> with torch.autocast("cpu", dtype=torch.bfloat16), without_autocast(torch.zeros(1)):
    ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
    torch.float32
    """
    if not isinstance(tensor, Tensor) or not torch.amp.is_autocast_available(tensor.device.type):
        return contextlib.nullcontext()  # not a tensor: the loss's own check names the argument
    if not torch.is_autocast_enabled(tensor.device.type):  # nothing to switch off (~5 µs saved a call)
        return contextlib.nullcontext()
    return torch.autocast(tensor.device.type, enabled=False)


def _describe(tensor: Tensor) -> str:
    return f"shape {tuple(tensor.shape)} and dtype {tensor.dtype}"


def check_floating(name: str, tensor: Any) -> None:
    """Raise ``TypeError`` unless ``tensor`` is a floating-point tensor."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"`{name}` must be a floating-point tensor, got {_describe(tensor)}")


def check_ndim(name: str, tensor: Tensor, ndims: int | Sequence[int]) -> None:
    """Raise ``ValueError`` unless ``tensor.ndim`` is one of ``ndims``."""
    allowed = (ndims,) if isinstance(ndims, int) else tuple(ndims)
    if tensor.ndim not in allowed:
        expected = " or ".join(str(n) for n in allowed)
        raise ValueError(f"`{name}` must have {expected} dimensions, got {_describe(tensor)}")


def check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    """Raise ``ValueError`` unless the option ``value`` is > 0 (>= 0 with ``allow_zero``)."""
    if not (value >= 0 if allow_zero else value > 0):
        raise ValueError(f"`{name}` must be {'non-negative' if allow_zero else 'positive'}, got {value}")


def check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    """Raise ``ValueError`` unless ``a`` and ``b`` have the same shape."""
    if a.shape != b.shape:
        raise ValueError(
            f"`{name_a}` and `{name_b}` must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def check_same_leading_dims(name_a: str, a: Tensor, name_b: str, b: Tensor, ndim: int) -> None:
    """Raise ``ValueError`` unless the first ``ndim`` dimensions of ``a`` and ``b`` agree."""
    if a.ndim < ndim or b.ndim < ndim or a.shape[:ndim] != b.shape[:ndim]:
        raise ValueError(
            f"the first {ndim} dimension(s) of `{name_a}` and `{name_b}` must match, "
            f"got shapes {tuple(a.shape)} and {tuple(b.shape)}"
        )


def check_mask(name: str, mask: Tensor, shape: torch.Size | Sequence[int]) -> None:
    """Raise unless ``mask`` is a bool, integer or floating tensor of exactly ``shape``."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(mask).__name__}")
    if mask.is_complex():
        raise TypeError(f"`{name}` must be a bool, integer or floating mask, got {_describe(mask)}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"`{name}` must have shape {tuple(shape)}, got {_describe(mask)}")


def check_class_targets(
    name: str,
    target: Tensor,
    num_classes: int,
    ignore_index: int | None = None,
    mask: Tensor | None = None,
) -> bool:
    """Check integer class targets: dtype always; the range ``[0, num_classes)`` of the elements that
    count (not ``ignore_index``, non-zero ``mask``) when value checks run.

    Returns whether the check found *every* element, counted or not, in range (False when it did not
    look): a caller may then skip its own handling of out-of-range ``ignore_index`` targets."""
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"`{name}` must hold integer class indices, got {_describe(target)}")
    if target.numel() == 0 or not value_checks_enabled(target):
        return False
    if num_classes > 0:  # every element in range, uncounted ones too (often so): one op
        low, high = torch.aminmax(target)
        if int(low) >= 0 and int(high) < num_classes:
            return True
    keep = None if mask is None else mask != 0
    if ignore_index is not None:
        keep = target != ignore_index if keep is None else keep & (target != ignore_index)
    if keep is not None and num_classes > 0:  # without boolean indexing: uncounted elements as class 0
        low, high = torch.aminmax(torch.where(keep, target, 0))
        if int(low) >= 0 and int(high) < num_classes:
            return False
    valid = target if keep is None else target[keep]
    if valid.numel() == 0:
        return False
    low, high = int(valid.min()), int(valid.max())
    if low < 0 or high >= num_classes:
        ignored = "" if ignore_index is None else f" (other than ignore_index={ignore_index})"
        raise ValueError(
            f"`{name}` must lie in [0, {num_classes}){ignored}, got values in [{low}, {high}] "
            f"for shape {tuple(target.shape)}"
        )
    return False


def check_finite(name: str, tensor: Tensor) -> None:
    """Raise ``ValueError`` if ``tensor`` holds NaN or inf (when value checks run)."""
    if not tensor.is_floating_point() or not value_checks_enabled(tensor):
        return
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(f"`{name}` holds {bad} non-finite value(s) (NaN or inf) in {_describe(tensor)}")


def as_metric(value: Any, device: torch.device | None = None) -> Tensor:
    """A detached 0-dim tensor from a tensor or Python number (metrics of user losses may be floats); a
    number is filled on ``device`` (made on the CPU and moved, it would be a host-device copy: a sync)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"a metric must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return value.detach().reshape(())
    if isinstance(value, (bool, int, float)):
        return torch.full((), float(value), device=device)
    raise TypeError(f"a metric must be a tensor or a number, got {type(value).__name__}")


def split_output(output: Any) -> LossOutput:
    """Normalize what a loss returned into ``LossOutput``.

    Accepts ``LossOutput``, a ``(loss, metrics)`` pair, or a bare tensor (``{"loss": loss}``).
    """
    if isinstance(output, Tensor):
        return LossOutput(output, {"loss": output.detach()})
    if isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], Mapping):
        loss, metrics = output
        if not isinstance(loss, Tensor):
            raise TypeError(f"a loss must return a tensor as its first element, got {type(loss).__name__}")
        metrics = {str(k): as_metric(v, loss.device) for k, v in metrics.items()}
        metrics.setdefault("loss", loss.detach())
        return LossOutput(loss, metrics)
    raise TypeError(f"a loss must return a tensor or a (loss, metrics) pair, got {type(output).__name__}")
