"""Adversarial training: FGSM / PGD attacks in an L∞ ball and the loss L_clean + α·L_adv.

The attack differentiates with ``torch.autograd.grad`` with respect to the (copied) inputs only: it never
writes into a parameter's ``.grad`` and never changes the caller's ``inputs`` (the guide's version called
``loss.backward()`` inside the loss and ``inputs.requires_grad_()`` in place, and ignored ``num_steps``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from lightning_losses.functional.cross_entropy import cross_entropy
from lightning_losses.protocol import check_floating, check_positive, compute_dtype

__all__ = [
    "AdversarialTerms",
    "adversarial_loss",
    "attack_mode",
    "check_attack_options",
    "default_step_size",
    "normal_tensor",
    "pgd_attack",
]


def normal_tensor(value: Any) -> Any:
    """A normal copy of an inference tensor (one created under ``torch.inference_mode()``, as a Trainer's
    test loop creates its batches), which autograd may save for the attack's backward; anything else as
    it is.

    >>> with torch.inference_mode():
    ...     t = torch.ones(2)
    >>> normal_tensor(t).is_inference(), normal_tensor(3)
    (False, 3)
    """
    if isinstance(value, Tensor) and value.is_inference():
        with torch.inference_mode(False):
            return value.clone()
    return value


class AdversarialTerms(NamedTuple):
    """What :func:`adversarial_loss` returns: ``loss, clean_loss, adversarial_loss, ... = ...``.

    ``adversarial_inputs`` are detached (the fixed inputs the adversarial term is evaluated on);
    ``clean_output`` / ``adversarial_output`` are the model's outputs on the clean and adversarial inputs.
    """

    loss: Tensor
    clean_loss: Tensor
    adversarial_loss: Tensor
    adversarial_inputs: Tensor
    clean_output: Any
    adversarial_output: Any


def default_step_size(epsilon: float, num_steps: int) -> float:
    """ε for FGSM (one step); ``2.5·ε / num_steps`` for PGD (Madry et al. 2018).

    >>> default_step_size(0.1, 1), default_step_size(0.1, 10)
    (0.1, 0.025)
    """
    return epsilon if num_steps == 1 else 2.5 * epsilon / num_steps


def check_attack_options(
    epsilon: float,
    num_steps: int,
    step_size: float | None,
    clamp_min: float | None,
    clamp_max: float | None,
    alpha: float | None = None,
) -> None:
    """Raise ``ValueError`` naming the option: ε < 0, ``num_steps`` < 1, a step size ≤ 0, an empty
    clamp range or (when given) α < 0."""
    check_positive("epsilon", epsilon, allow_zero=True)
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"`num_steps` must be an integer >= 1, got {num_steps!r}")
    if step_size is not None:
        check_positive("step_size", step_size)
    if clamp_min is not None and clamp_max is not None and clamp_min >= clamp_max:
        raise ValueError(f"`clamp_min` must be below `clamp_max`, got {clamp_min} and {clamp_max}")
    if alpha is not None:
        check_positive("alpha", alpha, allow_zero=True)


@contextlib.contextmanager
def attack_mode(model: nn.Module, eval_mode: bool = True) -> Iterator[None]:
    """Put ``model`` in eval mode for the attack, then restore every submodule's own ``training`` flag.

    In eval mode BatchNorm uses its running statistics (and does not update them with the attack's
    intermediate inputs) and Dropout is off, so the attack differentiates a deterministic function.
    With ``eval_mode=False`` nothing changes.

    >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train()
    >>> net[0].eval()  # a mixed state is restored exactly
    Linear(in_features=2, out_features=2, bias=True)
    >>> with attack_mode(net):
    ...     [m.training for m in net.modules()]
    [False, False, False]
    >>> [m.training for m in net.modules()]
    [True, False, True]
    """
    if not eval_mode:
        yield
        return
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def pgd_attack(
    objective: Callable[[Tensor], Tensor],
    inputs: Tensor,
    epsilon: float,
    num_steps: int = 1,
    step_size: float | None = None,
    random_start: bool = False,
    clamp_min: float | None = 0.0,
    clamp_max: float | None = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Inputs that increase ``objective`` inside the L∞ ball of radius ε around ``inputs`` (detached).

    Projected gradient ascent (Madry et al. 2018, "Towards Deep Learning Models Resistant to Adversarial
    Attacks"), from :math:`x^0 = x` or, with ``random_start``, :math:`x^0 = x + U(-\varepsilon,\varepsilon)`:

    .. math::
        x^{k+1} = \operatorname{clip}_{[a, b]}\Big(\Pi_{\|x' - x\|_\infty \le \varepsilon}
        \big(x^k + \eta\,\operatorname{sign}(\nabla_{x^k} \mathcal{L}(x^k))\big)\Big)

    ``num_steps=1`` with :math:`\eta = \varepsilon` and no random start is FGSM (Goodfellow, Shlens &
    Szegedy 2015): :math:`\operatorname{clip}(x + \varepsilon\,\operatorname{sign}(\nabla_x\mathcal{L}))`.
    The gradient is ``torch.autograd.grad`` with respect to a copy of the inputs only: no parameter's
    ``.grad`` is written, ``inputs`` is not modified. It runs with gradients enabled even when called
    under ``torch.no_grad()`` or ``torch.inference_mode()`` (a validation or test step); tensors that
    ``objective`` captures must then not be inference tensors (see :func:`normal_tensor`).

    Args:
        objective: maps inputs of the shape of ``inputs`` to a scalar to maximize (the sign of its
            gradient is all that is used, so a mean or a sum give the same attack).
        inputs: ``[B, ...]`` floating inputs (computed in float32 for bf16/fp16, float64 for float64).
        epsilon: the L∞ radius ε ≥ 0.
        num_steps: 1 (FGSM) or more (PGD).
        step_size: η; default :func:`default_step_size`.
        random_start: start from a uniform point of the ball.
        clamp_min / clamp_max: the valid input range (None: unbounded on that side).
        generator: for the random start.

    >>> w = torch.tensor([1.0, -2.0])
    >>> pgd_attack(lambda x: (x * w).sum(), torch.tensor([0.5, 0.5]), epsilon=0.1)
    tensor([0.6000, 0.4000])
    """
    check_floating("inputs", inputs)
    check_attack_options(epsilon, num_steps, step_size, clamp_min, clamp_max)
    eta = default_step_size(epsilon, num_steps) if step_size is None else step_size
    dtype = compute_dtype(inputs)
    with torch.inference_mode(False), torch.enable_grad():
        origin = inputs.detach().clone().to(dtype)  # a clone: a normal tensor even from inference mode
        low, high = origin - epsilon, origin + epsilon
        if clamp_min is not None:
            low, high = low.clamp(min=clamp_min), high.clamp(min=clamp_min)
        if clamp_max is not None:
            low, high = low.clamp(max=clamp_max), high.clamp(max=clamp_max)
        adversarial = origin
        if random_start:
            noise = torch.rand(origin.shape, generator=generator, dtype=dtype, device=origin.device)
            adversarial = torch.minimum(torch.maximum(origin + (2 * noise - 1) * epsilon, low), high)
        for _ in range(num_steps):
            adversarial = adversarial.detach().requires_grad_(True)
            value = objective(adversarial)
            if value.ndim != 0:
                raise ValueError(f"`objective` must return a scalar, got shape {tuple(value.shape)}")
            (grad,) = torch.autograd.grad(value, adversarial)
            stepped = adversarial.detach() + eta * grad.sign()
            adversarial = torch.minimum(torch.maximum(stepped, low), high)  # projection and clamp
    return adversarial.detach()


def adversarial_loss(
    model: Callable[[Tensor], Any],
    inputs: Tensor,
    target: Tensor,
    base_loss: Callable[[Any, Tensor], Tensor] = cross_entropy,
    logits: Any | None = None,
    *,
    epsilon: float = 0.1,
    alpha: float = 0.5,
    num_steps: int = 3,
    step_size: float | None = None,
    random_start: bool = False,
    clamp_min: float | None = 0.0,
    clamp_max: float | None = 1.0,
    attack_loss: Callable[[Any, Tensor], Tensor] | None = None,
    eval_mode_attack: bool = True,
    generator: torch.Generator | None = None,
) -> AdversarialTerms:
    r"""Adversarial training loss :math:`\mathcal{L} = \mathcal{L}(f(x), y) + \alpha\,\mathcal{L}(f(x'), y)`.

    :math:`x'` is the FGSM/PGD point of :func:`pgd_attack` maximizing ``attack_loss`` (default
    ``base_loss``), held fixed (detached): the gradient with respect to the parameters is that of the
    clean term plus α times the loss on the fixed adversarial inputs (Danskin's theorem, Madry et al.
    2018; Goodfellow, Shlens & Szegedy 2015 for the mixed clean + adversarial objective).

    BatchNorm / Dropout: the attack runs with ``model`` in eval mode (``eval_mode_attack``; running
    BatchNorm statistics, no dropout, no running-stat updates from intermediate attack points); the
    clean and adversarial forward passes of the loss then run in the model's own mode (so in training
    BatchNorm sees, and updates its statistics with, the clean and the final adversarial batch).

    Args:
        model: called as ``model(x)`` and returning what ``base_loss`` takes as its first argument;
            an ``nn.Module`` is switched to eval mode for the attack (``eval_mode_attack``).
        inputs: ``[B, ...]`` floating inputs.
        target: what ``base_loss`` takes as its second argument (``[B]`` class indices by default).
        base_loss: ``(logits, target) -> scalar``; default :func:`cross_entropy`.
        logits: the model's output on ``inputs`` when already computed (saves one forward pass).
        epsilon, num_steps, step_size, random_start, clamp_min, clamp_max, generator: see
            :func:`pgd_attack`.
        alpha: the weight α ≥ 0 of the adversarial term.
        attack_loss: the objective the attack maximizes; default ``base_loss``.
        eval_mode_attack: run the attack in eval mode (see above).

    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Linear(4, 3)
    >>> x, y = torch.rand(8, 4), torch.randint(0, 3, (8,))
    >>> terms = adversarial_loss(model, x, y, epsilon=0.1, num_steps=1)
    >>> bool(terms.adversarial_loss > terms.clean_loss), float((terms.adversarial_inputs - x).abs().max())
    (True, 0.1...)
    """
    check_floating("inputs", inputs)
    check_attack_options(epsilon, num_steps, step_size, clamp_min, clamp_max, alpha)
    if not isinstance(target, Tensor) or target.shape[:1] != inputs.shape[:1]:
        shape = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
        raise ValueError(
            f"`target` must be a tensor with the batch size of `inputs` first, got {shape} with `inputs` "
            f"of shape {tuple(inputs.shape)}"
        )
    if isinstance(logits, Tensor) and logits.shape[:1] != inputs.shape[:1]:
        raise ValueError(
            f"`logits` must have the batch size of `inputs` first, got shapes {tuple(logits.shape)} and "
            f"{tuple(inputs.shape)}"
        )
    objective_loss = base_loss if attack_loss is None else attack_loss
    dtype = compute_dtype(inputs)
    target = normal_tensor(target)
    is_module = isinstance(model, nn.Module)
    with attack_mode(model, eval_mode_attack) if is_module else contextlib.nullcontext():
        adversarial = pgd_attack(
            lambda x: objective_loss(model(x), target),
            inputs,
            epsilon,
            num_steps=num_steps,
            step_size=step_size,
            random_start=random_start,
            clamp_min=clamp_min,
            clamp_max=clamp_max,
            generator=generator,
        )
    clean_output = model(inputs.to(dtype)) if logits is None else logits
    adversarial_output = model(adversarial)
    clean = base_loss(clean_output, target).to(dtype)
    adversarial_term = base_loss(adversarial_output, target).to(dtype)
    return AdversarialTerms(
        clean + alpha * adversarial_term,
        clean,
        adversarial_term,
        adversarial,
        clean_output,
        adversarial_output,
    )
