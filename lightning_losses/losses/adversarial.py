"""``AdversarialLoss`` (``adversarial``): FGSM / PGD adversarial training around any base loss."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_losses.binding import callable_signature
from lightning_losses.functional.adversarial import adversarial_loss, check_attack_options, normal_tensor
from lightning_losses.functional.cross_entropy import row_argmax
from lightning_losses.protocol import LossFunction, LossOutput, split_output
from lightning_losses.registry import build_loss, register_loss

__all__ = ["AdversarialLoss"]

_PASSED_THROUGH = ("mask", "global_valid_toks")


@register_loss("adversarial")
class AdversarialLoss(LossFunction):
    r"""Adversarial training, :math:`\mathcal{L}_\text{clean} + \alpha\,\mathcal{L}_\text{adv}` (FGSM or PGD).

    See :func:`lightning_losses.functional.adversarial_loss` for the formula and
    :func:`lightning_losses.functional.pgd_attack` for the attack (Goodfellow, Shlens & Szegedy 2015;
    Madry et al. 2018). ``num_steps=1`` is FGSM, more is PGD with ``step_size``, optional
    ``random_start``, projection onto the ε-ball and clamping to ``[clamp_min, clamp_max]``.

    Inputs (resolved by name by ``LossModule``): ``model`` (the special name: the plain model),
    ``inputs`` (the batch's input tensor, the one the model is called with as ``model(inputs)``),
    ``target``; optionally ``logits`` (the model's clean output, reused instead of a second clean forward),
    and ``mask`` / ``global_valid_toks`` when the base loss takes them (then this loss has the base's
    ``loss_type`` and is exact under micro-batching and DDP, like the base).

    BatchNorm / Dropout: the attack runs in eval mode, then every submodule's mode is restored; the clean
    and adversarial terms run in the model's own mode. Under ``bf16-mixed`` the model's forward passes
    (attack included) run under the Trainer's autocast; the perturbation and the loss stay float32.
    Under DDP the attack calls the plain model inside ``training_step`` (inside DDP's forward) and
    differentiates with respect to the inputs only, so DDP's gradient hooks fire once, in the backward of
    the final loss, which uses every parameter.

    Args:
        base_loss: a registry name, ``{name, params}`` / ``{class_path, init_args}`` spec or module;
            default ``"cross_entropy"``. Called as ``base_loss(model_output, target, ...)``.
        epsilon: L∞ radius ε (in input units: digits are in [0, 1]).
        alpha: weight of the adversarial term.
        num_steps: 1 for FGSM, more for PGD.
        step_size: PGD step η; default ε for FGSM, ``2.5·ε/num_steps`` for PGD.
        random_start: start PGD from a uniform point of the ε-ball.
        clamp_min / clamp_max: the valid input range (``null`` for unbounded).
        eval_mode_attack: run the attack in eval mode (default True).
        output_key: when the model returns a dict, the entry passed to the base loss.

    Metrics: ``loss``, ``clean_loss``, ``adversarial_loss``, ``total_loss`` (= ``loss``),
    ``adversarial_perturbation`` (mean over samples of ‖x' − x‖∞, at most ε) and, for class-index targets
    of ``[N, C]`` outputs, ``clean_accuracy`` and ``adversarial_accuracy``.

    >>> _ = torch.manual_seed(0)
    >>> loss_fn = AdversarialLoss(epsilon=0.1, alpha=1.0, num_steps=5)
    >>> model = nn.Linear(4, 3)
    >>> loss, metrics = loss_fn(model, torch.rand(6, 4), torch.randint(0, 3, (6,)))
    >>> bool(metrics["adversarial_loss"] > metrics["clean_loss"])
    True
    >>> torch.allclose(loss, metrics["clean_loss"] + metrics["adversarial_loss"])
    True
    """

    def __init__(
        self,
        base_loss: str | dict[str, Any] | nn.Module = "cross_entropy",
        epsilon: float = 0.1,
        alpha: float = 0.5,
        num_steps: int = 3,
        step_size: float | None = None,
        random_start: bool = False,
        clamp_min: float | None = 0.0,
        clamp_max: float | None = 1.0,
        eval_mode_attack: bool = True,
        output_key: str = "logits",
    ) -> None:
        super().__init__()
        check_attack_options(epsilon, num_steps, step_size, clamp_min, clamp_max, alpha)
        self.base_loss = build_loss(base_loss)
        self.epsilon = epsilon
        self.alpha = alpha
        self.num_steps = num_steps
        self.step_size = step_size
        self.random_start = random_start
        self.clamp_min = clamp_min
        self.clamp_max = clamp_max
        self.eval_mode_attack = eval_mode_attack
        self.output_key = output_key
        base_parameters = callable_signature(self.base_loss).parameters
        self._passed_through = tuple(name for name in _PASSED_THROUGH if name in base_parameters)
        if "global_valid_toks" in self._passed_through:
            self.loss_type = getattr(self.base_loss, "loss_type", None)
            self.partial_metrics = ("clean_loss", "adversarial_loss", "total_loss")
        self.token_mask_key = getattr(self.base_loss, "token_mask_key", "mask")

    def forward_signature(self) -> inspect.Signature:
        """``forward``'s parameters without ``mask`` / ``global_valid_toks`` when the base loss lacks them,
        so that ``LossModule`` passes a global count only to a loss that divides by it."""
        signature = inspect.signature(self.forward)
        kept = [
            p
            for p in signature.parameters.values()
            if p.name not in _PASSED_THROUGH or p.name in self._passed_through
        ]
        return signature.replace(parameters=kept)

    def valid_tokens(self, inputs: Mapping[str, Any]) -> Tensor | None:
        """The base loss's denominator weights (what ``LossModule`` sums into ``global_valid_toks``)."""
        valid_tokens = getattr(self.base_loss, "valid_tokens", None)
        return valid_tokens(inputs) if callable(valid_tokens) else None

    def _model_output(self, output: Any) -> Tensor:
        if isinstance(output, Mapping):
            if self.output_key not in output:
                raise ValueError(
                    f"the model returned a dict with keys {sorted(output)}; set `output_key` to the entry "
                    f"the base loss takes (now {self.output_key!r})"
                )
            return output[self.output_key]
        return output

    def forward(
        self,
        model: nn.Module,
        inputs: Tensor,
        target: Tensor,
        logits: Tensor | None = None,
        mask: Tensor | None = None,
        global_valid_toks: Tensor | None = None,
    ) -> LossOutput:
        if not callable(model):
            raise TypeError(f"`model` must be callable (an nn.Module), got {type(model).__name__}")
        extras = {"mask": mask, "global_valid_toks": global_valid_toks}
        extras = {
            k: normal_tensor(v) for k, v in extras.items() if k in self._passed_through and v is not None
        }
        # the attack's objective: this batch's own mean (its sign is the same as the global share's)
        attack_extras = {k: v for k, v in extras.items() if k == "mask"}

        def base(output: Any, y: Tensor, **kwargs: Any) -> Tensor:
            output = self._model_output(output)
            if isinstance(self.base_loss, LossFunction):  # the value alone: its metrics would be dropped
                return self.base_loss.loss_only(output, y, **kwargs)
            return split_output(self.base_loss(output, y, **kwargs)).loss

        terms = adversarial_loss(
            model,
            inputs,
            target,
            lambda output, y: base(output, y, **extras),
            logits,
            epsilon=self.epsilon,
            alpha=self.alpha,
            num_steps=self.num_steps,
            step_size=self.step_size,
            random_start=self.random_start,
            clamp_min=self.clamp_min,
            clamp_max=self.clamp_max,
            attack_loss=lambda output, y: base(output, y, **attack_extras),
            eval_mode_attack=self.eval_mode_attack,
        )
        loss = terms.loss
        with torch.no_grad():
            delta = (terms.adversarial_inputs - inputs.detach().to(terms.adversarial_inputs.dtype)).abs()
            per_sample = (
                delta.reshape(delta.shape[0], -1).amax(dim=1) if delta.numel() else delta.new_zeros(1)
            )
            metrics = {
                "loss": loss.detach(),
                "clean_loss": terms.clean_loss.detach(),
                "adversarial_loss": terms.adversarial_loss.detach(),
                "total_loss": loss.detach(),
                "adversarial_perturbation": per_sample.mean(),
            }
            clean_out = self._model_output(terms.clean_output)
            adv_out = self._model_output(terms.adversarial_output)
            if (
                isinstance(clean_out, Tensor)
                and clean_out.ndim == 2
                and not target.is_floating_point()
                and target.shape == clean_out.shape[:1]
            ):
                # both accuracies from one [2, N] comparison: each op here is a few µs of a small step
                valid = target >= 0 if mask is None else (mask != 0) & (target >= 0)
                predicted = torch.stack((row_argmax(clean_out.detach()), row_argmax(adv_out.detach())))
                hits = ((predicted == target) & valid).count_nonzero(dim=1).to(loss.dtype)
                accuracy = hits / valid.count_nonzero().clamp_min(1)
                metrics["clean_accuracy"], metrics["adversarial_accuracy"] = accuracy.unbind()
        return LossOutput(loss, metrics)
