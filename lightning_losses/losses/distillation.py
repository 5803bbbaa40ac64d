"""``KLDivergenceLoss`` (``kl_divergence``): distillation from teacher logits or a frozen teacher module."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_losses.functional.cross_entropy import valid_mask
from lightning_losses.functional.distillation import (
    Direction,
    check_distillation_options,
    distillation_loss,
)
from lightning_losses.protocol import LossFunction, LossOutput, LossType
from lightning_losses.registry import register_loss

__all__ = ["KLDivergenceLoss", "load_teacher_weights"]


def load_teacher_weights(teacher: nn.Module, checkpoint: str | Path, prefix: str = "model.") -> None:
    """Load ``teacher``'s weights from a checkpoint file, strictly.

    The file is a Lightning checkpoint (its ``"state_dict"``; a ``LossModule``'s keys are
    ``"model.<...>"``, so ``prefix="model."`` picks its model) or a plain state dict. Keys that start with
    ``prefix`` are kept with the prefix removed; ``prefix=""`` keeps every key. Loaded with
    ``torch.load(weights_only=True)`` (tensors and plain containers only).

    >>> import os, tempfile
    >>> teacher = torch.nn.Linear(3, 2)
    >>> state = {"model.weight": torch.ones(2, 3), "model.bias": torch.zeros(2), "loss.scale": torch.ones(())}
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = os.path.join(folder, "teacher.ckpt")
    ...     torch.save({"state_dict": state}, path)  # what a LossModule checkpoint holds
    ...     load_teacher_weights(teacher, path)  # keeps "model.*", drops the prefix
    >>> teacher.weight.sum().item(), teacher.bias.sum().item()
    (6.0, 0.0)
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(
            f"`teacher_checkpoint` {str(checkpoint)!r} is not a file (relative paths are resolved from the "
            f"working directory {str(Path.cwd())!r}); train the teacher first"
        )
    content = torch.load(path, map_location="cpu", weights_only=True)
    state = content.get("state_dict", content) if isinstance(content, Mapping) else None
    if not isinstance(state, Mapping):
        raise ValueError(f"`teacher_checkpoint` {str(checkpoint)!r} holds no state dict")
    weights = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    if not weights:
        raise ValueError(
            f"no key of `teacher_checkpoint` {str(checkpoint)!r} starts with {prefix!r}; "
            f"its keys start with {sorted({key.split('.')[0] + '.' for key in state})}"
        )
    teacher.load_state_dict(weights, strict=True)


@register_loss("kl_divergence")
class KLDivergenceLoss(LossFunction):
    r"""Knowledge distillation (Hinton, Vinyals & Dean, 2015): a student learns a teacher's soft targets.

    :math:`L = \alpha\,\mathrm{CE}(z^{s}, y) + (1-\alpha)\,T^2\,\mathrm{KL}(\mathrm{softmax}(z^{t}/T)\,\|\,
    \mathrm{softmax}(z^{s}/T))`; without ``target`` the :math:`T^2\,\mathrm{KL}` term alone. ``direction``
    picks forward KL, reverse KL or a generalized Jensen–Shannon divergence; see
    :func:`lightning_losses.functional.distillation.distillation_loss` for the formulas, shapes and
    reductions. ``[N, C]`` classification or token-level ``[B, T, V]`` with a ``mask``: given
    ``global_valid_toks`` (``LossModule`` counts it with :meth:`valid_tokens`) it is TOKEN_LEVEL.

    The teacher logits come from one of:

    - ``teacher_logits``, an input (a batch key, resolved by name by ``LossModule``); or
    - ``teacher``, a module called on ``inputs`` (the batch's model input). It is frozen in place (the
      module passed is changed, not copied: pass ``copy.deepcopy(m)`` to keep ``m`` trainable): its
      parameters do not require grad (so ``LossModule`` gives them to no optimizer), it runs under
      ``torch.no_grad()``, and it stays in eval mode (``train()`` does not switch it, so dropout and
      batch norm behave as at inference). ``teacher_checkpoint`` loads its weights from a ``LossModule``
      checkpoint (keys ``"model.<...>"``) or a state dict file. Its weights are also saved in the
      student's checkpoints (``loss.teacher.<...>``). Lightning warns "Found N module(s) in eval mode
      at the start of training": those are the teacher's, on purpose.

    Teacher logits are constants either way (detached): no gradient reaches the teacher.

    Args:
        temperature: :math:`T > 0` softening both distributions.
        alpha: weight of the cross-entropy term, in [0, 1]; unused without targets.
        direction: ``"forward"`` (KL(teacher ‖ student), Hinton's), ``"reverse"`` (KL(student ‖ teacher))
            or ``"jsd"`` (generalized JSD, P = teacher, Q = student).
        beta: β ∈ (0, 1) of ``"jsd"``; 0.5 is the symmetric Jensen–Shannon divergence.
        ignore_index: target value the cross-entropy term skips.
        teacher: optional frozen teacher network (``inputs`` → logits, or a dict holding them).
        teacher_checkpoint: optional path of the teacher's weights (needs ``teacher``).
        teacher_checkpoint_prefix: the prefix of the teacher's keys in that file.
        teacher_output_key: the logits' key when the teacher returns a dict.

    Both terms skip the rows the ``mask`` or an ``ignore_index`` target rules out; ``valid_tokens``
    counts those rows, so under ``LossModule`` ``global_valid_toks`` is exactly the local denominator.

    Metrics: ``loss``, ``total_loss`` (the same value, the guide's name), ``kl_loss`` (:math:`T^2` times
    the divergence), ``task_loss`` (the cross-entropy term; 0, the sum over no labelled rows, for a batch
    without ``target``) and ``temperature``. The keys are the same on every step, labelled or not, so
    that DDP ranks holding different kinds of batches sync the same metrics at the end of an epoch.

    >>> student, teacher = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    >>> loss, metrics = KLDivergenceLoss(temperature=2.0, alpha=0.5)(student, teacher, torch.tensor([0, 1]))
    >>> sorted(metrics)
    ['kl_loss', 'loss', 'task_loss', 'temperature', 'total_loss']
    >>> KLDivergenceLoss()(student, teacher).metrics["task_loss"]  # no targets: the same keys
    tensor(0.)
    >>> frozen = KLDivergenceLoss(teacher=torch.nn.Linear(3, 2))
    >>> frozen.train().teacher.training, frozen.teacher.weight.requires_grad
    (False, False)
    >>> frozen(torch.zeros(4, 2, requires_grad=True), inputs=torch.randn(4, 3)).loss.shape
    torch.Size([])
    """

    loss_type = LossType.TOKEN_LEVEL
    token_mask_key = "mask"
    partial_metrics = ("total_loss", "kl_loss", "task_loss")

    def __init__(
        self,
        temperature: float = 4.0,
        alpha: float = 0.7,
        direction: Direction = "forward",
        beta: float = 0.5,
        ignore_index: int = -100,
        teacher: nn.Module | None = None,
        teacher_checkpoint: str | None = None,
        teacher_checkpoint_prefix: str = "model.",
        teacher_output_key: str = "logits",
    ) -> None:
        super().__init__()
        check_distillation_options(temperature, direction, beta, alpha)
        if teacher is not None and not isinstance(teacher, nn.Module):
            raise TypeError(f"`teacher` must be an nn.Module or None, got {type(teacher).__name__}")
        if teacher_checkpoint is not None and teacher is None:
            raise ValueError(
                f"`teacher_checkpoint` ({teacher_checkpoint!r}) needs `teacher`, the network to load it into"
            )
        self.temperature = temperature
        self.alpha = alpha
        self.direction = direction
        self.beta = beta
        self.ignore_index = ignore_index
        self.teacher_output_key = teacher_output_key
        self.teacher = teacher
        if teacher is not None:
            if teacher_checkpoint is not None:
                load_teacher_weights(teacher, teacher_checkpoint, teacher_checkpoint_prefix)
            teacher.requires_grad_(False)
            teacher.eval()

    def train(self, mode: bool = True) -> KLDivergenceLoss:
        """Set the training mode of this loss; the teacher always stays in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def valid_tokens(self, inputs: Mapping[str, Any]) -> Tensor:
        """The rows both terms average over: ``mask`` (ones without it) times ``target != ignore_index``
        when ``target`` is given. Always a tensor, so that every DDP rank, labelled or not, takes part
        in ``LossModule``'s all-reduce of the count."""
        target, mask = inputs.get("target"), inputs.get("mask")
        if target is not None:
            return valid_mask(target, mask, self.ignore_index)
        if mask is not None:
            return mask.to(torch.float32)
        return torch.ones(inputs["logits"].shape[:-1], device=inputs["logits"].device)

    def teacher_forward(self, inputs: Any) -> Tensor:
        """The frozen teacher's logits on ``inputs`` (no grad, eval mode)."""
        if self.teacher is None:
            raise ValueError("this KLDivergenceLoss has no `teacher` module")
        with torch.no_grad():
            out = self.teacher(inputs)
        if isinstance(out, Mapping):
            if self.teacher_output_key not in out:
                raise ValueError(
                    f"the teacher returned a dict with keys {sorted(out)}, without "
                    f"`teacher_output_key` {self.teacher_output_key!r}"
                )
            out = out[self.teacher_output_key]
        if not isinstance(out, Tensor):
            raise TypeError(f"the teacher must return a tensor (or a dict of them), got {type(out).__name__}")
        return out

    def forward(
        self,
        logits: Tensor,
        teacher_logits: Tensor | None = None,
        target: Tensor | None = None,
        mask: Tensor | None = None,
        global_valid_toks: Tensor | None = None,
        inputs: Any = None,
    ) -> LossOutput:
        if self.teacher is not None:
            if teacher_logits is not None:
                raise ValueError(
                    "got both `teacher_logits` and a `teacher` module; give one (drop the batch key "
                    "'teacher_logits' or the loss's `teacher`)"
                )
            if inputs is None:
                raise ValueError("the `teacher` module needs `inputs` (the batch's model input), got None")
            teacher_logits = self.teacher_forward(inputs)
        elif teacher_logits is None:
            raise ValueError(
                "KLDivergenceLoss needs `teacher_logits` (e.g. a batch key of that name) or a `teacher` "
                "module; got neither"
            )
        terms = distillation_loss(
            logits,
            teacher_logits.detach(),
            target,
            mask,
            global_valid_toks,
            temperature=self.temperature,
            alpha=self.alpha,
            direction=self.direction,
            beta=self.beta,
            ignore_index=self.ignore_index,
        )
        loss = terms.loss
        metrics = {
            "loss": loss.detach(),
            "total_loss": loss.detach(),
            "kl_loss": terms.kl_loss.detach(),
            "task_loss": loss.new_zeros(()) if terms.task_loss is None else terms.task_loss.detach(),
            "temperature": torch.full((), self.temperature, dtype=loss.dtype, device=loss.device),
        }
        return LossOutput(loss, metrics)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}, direction={self.direction!r}" + (
            f", beta={self.beta}" if self.direction == "jsd" else ""
        )
