"""``KNNAccuracy``: leave-one-out k-nearest-neighbour accuracy of embeddings, a torchmetrics ``Metric``."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_losses.protocol import compute_dtype

__all__ = ["KNNAccuracy"]


class KNNAccuracy(Metric):
    """How well embeddings separate classes: leave-one-out k-NN majority vote among the accumulated rows.

    ``update(preds, target)`` accumulates embeddings ``[B, D]`` and integer labels ``[B]`` (states
    concatenated over DDP ranks). ``compute()`` predicts each accumulated row's label by a majority
    vote of its ``k`` nearest *other* rows (the row itself never votes; a duplicate of it does) and
    returns the share predicted right. A tie between classes goes to the tied class of the nearest
    neighbour. Fewer than ``k + 1`` rows use all the other rows; fewer than 2 rows give 0.

    In a ``LossModule`` config: ``metrics: {knn_accuracy: {class_path: ...KNNAccuracy}}`` with
    ``preds_key`` naming the embeddings output.

    Args:
        k: number of neighbours that vote (≥ 1).
        distance: ``"euclidean"`` or ``"cosine"`` (1 - cosine similarity).
        query_chunk_size: rows whose neighbours are searched at once (memory ``chunk × rows``).
        kwargs: passed to :class:`torchmetrics.Metric`.

    >>> metric = KNNAccuracy(k=1)
    >>> metric.update(torch.tensor([[0.0], [0.1], [5.0], [5.2]]), torch.tensor([0, 0, 1, 1]))
    >>> metric.update(torch.tensor([[1.0]]), torch.tensor([1]))  # its nearest neighbour is class 0
    >>> metric.compute()
    tensor(0.8000)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        k: int = 5,
        distance: Literal["euclidean", "cosine"] = "euclidean",
        query_chunk_size: int = 1024,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"`k` must be a positive integer, got {k!r}")
        if distance not in ("euclidean", "cosine"):
            raise ValueError(f"`distance` must be 'euclidean' or 'cosine', got {distance!r}")
        if not isinstance(query_chunk_size, int) or query_chunk_size < 1:
            raise ValueError(f"`query_chunk_size` must be a positive integer, got {query_chunk_size!r}")
        self.k = k
        self.distance = distance
        self.query_chunk_size = query_chunk_size
        self.add_state("embeddings", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add embeddings ``preds [B, D]`` and their integer labels ``target [B]``."""
        if not isinstance(preds, Tensor) or not preds.is_floating_point() or preds.ndim != 2:
            raise ValueError(
                f"`preds` must be floating embeddings [B, D], got "
                f"{tuple(preds.shape) if isinstance(preds, Tensor) else type(preds).__name__}"
                f"{f' and dtype {preds.dtype}' if isinstance(preds, Tensor) else ''}"
            )
        if not isinstance(target, Tensor) or target.is_floating_point() or target.shape != preds.shape[:1]:
            raise ValueError(
                f"`target` must be integer labels of shape ({preds.shape[0]},) for `preds` of shape "
                f"{tuple(preds.shape)}, got "
                f"{(tuple(target.shape), target.dtype) if isinstance(target, Tensor) else type(target)}"
            )
        self.embeddings.append(preds.detach())
        self.labels.append(target.detach())

    def compute(self) -> Tensor:
        """Leave-one-out k-NN accuracy of every row accumulated so far."""
        if not self.embeddings:
            return torch.tensor(0.0, device=self.device)
        embeddings = dim_zero_cat(self.embeddings)
        embeddings = embeddings.to(compute_dtype(embeddings))
        _, labels = torch.unique(dim_zero_cat(self.labels), return_inverse=True)  # classes 0..C-1
        num_rows = len(embeddings)
        if num_rows < 2:
            return torch.tensor(0.0, device=embeddings.device)
        k = min(self.k, num_rows - 1)
        num_classes = int(labels.max()) + 1
        if self.distance == "cosine":
            embeddings = F.normalize(embeddings, dim=-1)
        # distances do not change under translation; centring shrinks the cancellation in ‖x‖² − 2q·x
        embeddings = embeddings - embeddings.mean(dim=0, keepdim=True)
        squared_norms = embeddings.pow(2).sum(-1)
        correct = torch.zeros((), dtype=torch.long, device=embeddings.device)
        for start in range(0, num_rows, self.query_chunk_size):
            queries = embeddings[start : start + self.query_chunk_size]
            rows = torch.arange(start, start + len(queries), device=embeddings.device)
            # ranking only: ‖q − x‖² − ‖q‖² = ‖x‖² − 2 q·x (cosine: 2 − 2 q·x on unit rows, same order)
            scores = squared_norms[None, :] - 2 * queries @ embeddings.T
            scores[torch.arange(len(queries), device=scores.device), rows] = float("inf")  # not itself
            neighbours = scores.topk(k, dim=1, largest=False).indices  # nearest first
            neighbour_labels = labels[neighbours]
            votes = torch.zeros(len(queries), num_classes, dtype=torch.long, device=scores.device)
            votes.scatter_add_(1, neighbour_labels, torch.ones_like(neighbour_labels))
            tied = votes == votes.max(dim=1, keepdim=True).values
            first_tied = tied.gather(1, neighbour_labels).to(torch.uint8).argmax(dim=1, keepdim=True)
            predicted = neighbour_labels.gather(1, first_tied).squeeze(1)
            correct += (predicted == labels[rows]).sum()
        return correct.to(torch.float32) / num_rows
