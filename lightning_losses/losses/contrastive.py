"""``ContrastiveLoss`` (``contrastive``), ``InfoNCELoss`` (``infonce``) and ``SupConLoss`` (``supcon``).

Batch-level losses (``loss_type = None``): each averages over the pairs of its own batch, whose other
elements are the negatives. Under DDP every rank contrasts its local batch only.
"""

from __future__ import annotations

from torch import Tensor

from lightning_losses.functional.contrastive import (
    check_chunk_size,
    contrastive_loss_with_metrics,
    info_nce_loss_with_metrics,
    supervised_contrastive_loss_with_metrics,
)
from lightning_losses.protocol import LossFunction, LossOutput, check_positive
from lightning_losses.registry import register_loss

__all__ = ["ContrastiveLoss", "InfoNCELoss", "SupConLoss"]


@register_loss("contrastive")
class ContrastiveLoss(LossFunction):
    """Margin contrastive loss over every pair of a batch (Hadsell, Chopra & LeCun, CVPR 2006).

    Mean squared distance of same-label pairs plus ``negative_weight`` times the mean of
    ``max(0, margin - d)²`` over different-label pairs; see
    :func:`lightning_losses.functional.contrastive.contrastive_loss`. Embeddings are not normalized.

    Args:
        margin: distance beyond which different-label pairs cost nothing (> 0).
        negative_weight: weight of the negative term (≥ 0).
        chunk_size: anchor rows per block of the fused computation (memory O(chunk × batch) on any
            device); ``None`` picks blocks of ~1 MiB on a CPU and the whole matrix on a GPU. Same result
            up to rounding.

    Inputs: ``embeddings [N, D]`` and ``target [N]`` integer labels.
    Metrics: ``loss``, ``contrastive_loss``, ``positive_loss``, ``negative_loss``,
    ``mean_positive_distance``, ``mean_negative_distance``.

    >>> import torch
    >>> loss, metrics = ContrastiveLoss(margin=2.0)(
    ...     torch.tensor([[0.0, 0.0], [0.5, 0.0], [2.0, 0.0]]), torch.tensor([0, 0, 1])
    ... )
    >>> loss, metrics["mean_positive_distance"]
    (tensor(0.3750), tensor(0.5000))
    """

    def __init__(
        self, margin: float = 1.0, negative_weight: float = 1.0, chunk_size: int | None = None
    ) -> None:
        super().__init__()
        check_positive("margin", margin)
        check_chunk_size(chunk_size)
        if not negative_weight >= 0:
            raise ValueError(f"`negative_weight` must be non-negative, got {negative_weight}")
        self.margin = margin
        self.negative_weight = negative_weight
        self.chunk_size = chunk_size

    def forward(self, embeddings: Tensor, target: Tensor) -> LossOutput:
        loss, metrics = contrastive_loss_with_metrics(
            embeddings,
            target,
            margin=self.margin,
            negative_weight=self.negative_weight,
            chunk_size=self.chunk_size,
        )
        return LossOutput(loss, {"loss": loss.detach(), **metrics})

    def extra_repr(self) -> str:
        return f"margin={self.margin}, negative_weight={self.negative_weight}, chunk_size={self.chunk_size}"


@register_loss("infonce")
class InfoNCELoss(LossFunction):
    """InfoNCE / NT-Xent over two views (SimCLR, Chen et al. 2020; van den Oord et al. 2018).

    Each of the ``2N`` rows is an anchor whose positive is its other view and whose negatives are the
    other ``2N - 2`` rows; see :func:`lightning_losses.functional.contrastive.info_nce_loss`.

    Args:
        temperature: τ > 0 dividing the similarities.
        normalize: L2-normalize the embeddings first (cosine similarity); ``False`` uses dot products.
        chunk_size: ``None`` builds the whole similarity matrix; an integer walks over that many anchor
            rows at a time (memory O(chunk × batch) instead of several [batch, batch] matrices; the
            gradient is computed in the forward pass). Same result up to rounding.

    Inputs: ``embeddings [N, D]`` and ``positive_embeddings [N, D]`` (row ``i`` of each is a view of
    the same sample).
    Metrics: ``loss``, ``accuracy`` (the positive is the most similar other row),
    ``mean_positive_similarity``, ``mean_negative_similarity``.

    >>> import torch
    >>> views = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> loss, metrics = InfoNCELoss(temperature=1.0)(views, views)
    >>> loss, metrics["accuracy"]
    (tensor(0.5514), tensor(1.))
    """

    def __init__(
        self, temperature: float = 0.1, normalize: bool = True, chunk_size: int | None = None
    ) -> None:
        super().__init__()
        check_positive("temperature", temperature)
        check_chunk_size(chunk_size)
        self.temperature = temperature
        self.normalize = normalize
        self.chunk_size = chunk_size

    def forward(self, embeddings: Tensor, positive_embeddings: Tensor) -> LossOutput:
        loss, metrics = info_nce_loss_with_metrics(
            embeddings,
            positive_embeddings,
            temperature=self.temperature,
            normalize=self.normalize,
            chunk_size=self.chunk_size,
        )
        return LossOutput(loss, {"loss": loss.detach(), **metrics})

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, normalize={self.normalize}, chunk_size={self.chunk_size}"


@register_loss("supcon")
class SupConLoss(LossFunction):
    """Supervised contrastive loss, L_out form (Khosla et al., NeurIPS 2020).

    Every view of every sample is an anchor; its positives are the other rows with its label. Anchors
    without a positive do not count; a batch without positive pairs gives 0. See
    :func:`lightning_losses.functional.contrastive.supervised_contrastive_loss`.

    Args:
        temperature: τ > 0 dividing the similarities.
        normalize: L2-normalize the embeddings first (cosine similarity); ``False`` uses dot products.
        chunk_size: ``None`` builds the whole similarity matrix; an integer walks over that many anchor
            rows at a time (memory O(chunk × batch) instead of several [batch, batch] matrices; the
            gradient is computed in the forward pass). Same result up to rounding.

    Inputs: ``embeddings [N, D]`` or ``[N, V, D]`` (``V`` views) and ``target [N]`` integer labels.
    Metrics: ``loss``, ``anchors_with_positives``, ``mean_positive_similarity``,
    ``mean_negative_similarity``.

    >>> import torch
    >>> loss_fn = SupConLoss(temperature=1.0)
    >>> loss_fn(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0, 1])).loss
    tensor(0.3133)
    """

    def __init__(
        self, temperature: float = 0.1, normalize: bool = True, chunk_size: int | None = None
    ) -> None:
        super().__init__()
        check_positive("temperature", temperature)
        check_chunk_size(chunk_size)
        self.temperature = temperature
        self.normalize = normalize
        self.chunk_size = chunk_size

    def forward(self, embeddings: Tensor, target: Tensor) -> LossOutput:
        loss, metrics = supervised_contrastive_loss_with_metrics(
            embeddings,
            target,
            temperature=self.temperature,
            normalize=self.normalize,
            chunk_size=self.chunk_size,
        )
        return LossOutput(loss, {"loss": loss.detach(), **metrics})

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, normalize={self.normalize}, chunk_size={self.chunk_size}"
