"""``GradientNormLogger``: the gradient norm, total and per optimizer parameter group, logged each step."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["GradientNormLogger", "gradient_norms"]


def gradient_norms(optimizer: Optimizer, norm_type: float = 2.0) -> dict[str, Tensor]:
    """``{"total": ‖g‖, "group_0": ‖g₀‖, ...}`` over the parameters of ``optimizer`` that have a gradient.

    The norms stay tensors on the gradients' device: nothing is read back to the host.

    >>> w = torch.nn.Parameter(torch.zeros(2)); w.grad = torch.tensor([3.0, 4.0])
    >>> gradient_norms(torch.optim.SGD([w], lr=0.1))
    {'total': tensor(5.), 'group_0': tensor(5.)}
    """
    group_norms: dict[str, Tensor] = {}
    for index, group in enumerate(optimizer.param_groups):
        grads = [p.grad.detach() for p in group["params"] if p.grad is not None]
        if grads:
            per_tensor = torch.stack([torch.linalg.vector_norm(g.float(), norm_type) for g in grads])
            group_norms[f"group_{index}"] = torch.linalg.vector_norm(per_tensor, norm_type)
    if not group_norms:
        return {}
    total = torch.linalg.vector_norm(torch.stack(list(group_norms.values())), norm_type)
    return {"total": total, **group_norms}


class GradientNormLogger(pl.Callback):
    """Log ``grad_norm/total`` and ``grad_norm/group_<i>`` before each optimizer step.

    The norms are those of the gradients the optimizer is about to use, unscaled (after the AMP
    scaler's unscale) and *before* gradient clipping, so a clipped run shows how much was clipped.
    They are logged as tensors without a sync: the host reads them only when the logger writes (every
    ``log_every_n_steps``).

    Args:
        norm_type: the p of the p-norm (``2.0``; ``float("inf")`` for the max-norm).
        per_group: also log each parameter group's norm.

    Example (YAML: ``trainer.callbacks: [{class_path: lightning_losses.callbacks.GradientNormLogger}]``)::

        trainer = pl.Trainer(callbacks=[GradientNormLogger()], gradient_clip_val=1.0)
    """

    def __init__(self, norm_type: float = 2.0, per_group: bool = True) -> None:
        if norm_type <= 0:
            raise ValueError(f"`norm_type` must be positive, got {norm_type}")
        self.norm_type = float(norm_type)
        self.per_group = per_group

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        norms = gradient_norms(optimizer, self.norm_type)
        if not self.per_group:
            norms = {k: v for k, v in norms.items() if k == "total"}
        for name, value in norms.items():
            pl_module.log(f"grad_norm/{name}", value, on_step=True, on_epoch=False)
