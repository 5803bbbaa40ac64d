r"""Contrastive objectives on embeddings: margin contrastive, InfoNCE / NT-Xent and supervised contrastive.

All three compare every pair of a batch through one ``[M, M]`` matrix (a matrix product of the
embeddings), never an ``[M, M, D]`` tensor of differences. Negatives are the other elements of *this*
batch: under DDP each rank contrasts its own batch (nothing is gathered across ranks).

With ``chunk_size`` set, :func:`info_nce_loss` and :func:`supervised_contrastive_loss` never hold the
whole ``[M, M]`` matrix: a custom autograd function walks over ``chunk_size`` anchor rows at a time,
computes their similarities to all rows, their log-softmax, their loss terms and, in the same pass, their
contribution to the gradient of the embeddings (to the chunk's rows and, through the columns, to every
row), so memory is :math:`O(\text{chunk} \cdot M + M D)` instead of several ``[M, M]`` tensors
(at :math:`M = 16384` one fp32 ``[M, M]`` is 1 GiB). :func:`contrastive_loss` always runs such a function
in eager mode (blocks of about 1 MiB on a CPU unless ``chunk_size`` says otherwise).

Each loss has a plain form returning the loss tensor and a ``*_with_metrics`` form returning
``(loss, metrics)`` with detached 0-dim metrics (what the modules of :mod:`lightning_losses.losses` log).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_losses.functional.cross_entropy import (
    FUSED_MIN_BYTES,
    fused_path,
    per_row_cross_entropy,
    row_argmax,
    row_blocks,
    target_is_argmax,
)
from lightning_losses.protocol import (
    check_floating,
    check_ndim,
    check_positive,
    check_same_shape,
    compute_dtype,
    without_autocast,
)
from lightning_losses.reduction import divide_by_count

__all__ = [
    "contrastive_loss",
    "contrastive_loss_with_metrics",
    "info_nce_loss",
    "info_nce_loss_with_metrics",
    "pairwise_squared_distances",
    "safe_sqrt",
    "supervised_contrastive_loss",
    "supervised_contrastive_loss_with_metrics",
]

_NORMALIZE_EPS = 1e-12  # F.normalize's default: rows are divided by max(‖z‖, eps)

# ----------------------------------------------------------------------------------------------------
# shared pieces
# ----------------------------------------------------------------------------------------------------


_Loss = TypeVar("_Loss", bound=Callable[..., tuple[Tensor, dict[str, Tensor]]])


def _without_autocast(loss_fn: _Loss) -> _Loss:
    """Runs ``loss_fn(embeddings, ...)`` with autocast off on the embeddings' device: the similarity and
    Gram products are the loss itself, so they stay in the compute dtype under bf16/fp16 autocast."""

    @functools.wraps(loss_fn)
    def run(embeddings: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, dict[str, Tensor]]:
        with without_autocast(embeddings):
            return loss_fn(embeddings, *args, **kwargs)

    return run  # type: ignore[return-value]


def _check_labels(name: str, target: Tensor, embeddings_name: str, embeddings: Tensor) -> None:
    """``target`` must be integer class labels ``[N]`` for embeddings ``[N, ...]`` (any integer values)."""
    if not isinstance(target, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(
            f"`{name}` must hold integer class labels, "
            f"got shape {tuple(target.shape)} and dtype {target.dtype}"
        )
    if target.shape != embeddings.shape[:1]:
        raise ValueError(
            f"`{name}` must have shape ({embeddings.shape[0]},), one label per row of `{embeddings_name}`, "
            f"got {tuple(target.shape)} with `{embeddings_name}` of shape {tuple(embeddings.shape)}"
        )


def safe_sqrt(squared: Tensor) -> Tensor:
    """``sqrt`` whose value is exact everywhere and whose gradient at 0 is 0 (not inf/NaN).

    The "double where": the inner ``where`` keeps ``sqrt`` away from 0 so its backward never divides by
    0; the outer one puts the exact 0 back and sends no gradient to the inner branch there.

    >>> x = torch.tensor([0.0, 4.0], requires_grad=True)
    >>> y = safe_sqrt(x)
    >>> y.sum().backward()
    >>> y.detach(), x.grad
    (tensor([0., 2.]), tensor([0.0000, 0.2500]))
    """
    positive = squared > 0
    return torch.where(positive, torch.where(positive, squared, torch.ones_like(squared)).sqrt(), 0.0)


def pairwise_squared_distances(embeddings: Tensor) -> Tensor:
    r"""Squared Euclidean distances :math:`\|x_i - x_j\|^2` of all rows, ``[N, D]`` → ``[N, N]``.

    Computed as :math:`G_{ii} + G_{jj} - 2G_{ij}` from the Gram matrix :math:`G = X X^\top` of the
    embeddings *centred on their batch mean* (distances do not change; the cancellation error,
    about :math:`\epsilon (\|x_i\|^2 + \|x_j\|^2)`, shrinks), clamped at 0 (rounding can make it slightly
    negative). Memory is :math:`O(N^2 + ND)`: no ``[N, N, D]`` tensor. The diagonal is exactly 0, and
    so are (in practice; the BLAS decides) the distances between bit-identical rows. Distances much
    smaller than :math:`\sqrt{\epsilon}\,\|x\|` are resolved to about that accuracy only (fp32:
    :math:`\approx 3\cdot 10^{-4}\|x\|`).

    >>> pairwise_squared_distances(torch.tensor([[0.0, 0.0], [3.0, 4.0]]))
    tensor([[ 0., 25.],
            [25.,  0.]])
    """
    centred = embeddings - embeddings.mean(dim=0, keepdim=True)
    gram = centred @ centred.T
    squared_norms = gram.diagonal()
    return (squared_norms[:, None] + squared_norms[None, :] - 2 * gram).clamp(min=0)


# ----------------------------------------------------------------------------------------------------
# the chunked path shared by InfoNCE and SupCon: anchor-row chunks, gradient computed in the forward pass
# ----------------------------------------------------------------------------------------------------


def check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"`chunk_size` must be a positive integer or None, got {chunk_size!r}")


class _ChunkedSupCon(torch.autograd.Function):
    r"""SupCon over rows ``z [M, D]`` (already normalized) with labels ``[M]``, ``chunk_size`` anchors at a
    time. Returns ``(loss, positive_sum [M], negative_sum [M], num_positives [M], argmax [M])``; only
    ``loss`` is differentiable. The per-row sums are of :math:`s = z z^\top / \tau` over the row's
    positives / negatives; ``argmax`` is the row's most similar other row.

    For anchor :math:`i` with :math:`n_i = |P(i)| > 0`, :math:`\partial L / \partial s_{ij} =
    (\mathrm{softmax}_{a \ne i}(s_i)_j - [j \in P(i)] / n_i) / |I^+|` (call it :math:`G_{ij}`), and
    :math:`\partial L / \partial z = (G + G^\top) z / \tau`: each chunk adds :math:`G_C z / \tau` to its
    own rows and :math:`G_C^\top z_C / \tau` to all rows.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, z: Tensor, labels: Tensor, temperature: float, chunk_size: int, need_grad: bool
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        num_rows = len(z)
        step = max(1, min(chunk_size, num_rows))
        positive_sum = torch.empty(num_rows, dtype=z.dtype, device=z.device)
        negative_sum = torch.empty_like(positive_sum)
        num_positives = torch.empty(num_rows, dtype=torch.long, device=z.device)
        argmax = torch.empty(num_rows, dtype=torch.long, device=z.device)
        loss_sum = torch.zeros((), dtype=z.dtype, device=z.device)
        grad = torch.zeros_like(z) if need_grad else None
        for start in range(0, num_rows, step):
            stop = min(start + step, num_rows)
            rows = slice(start, stop)
            s = torch.mm(z[rows], z.T).div_(temperature)  # [c, M]
            diagonal = s.diagonal(offset=start)  # s[k, start + k]: the anchors themselves
            row_total = s.sum(1) - diagonal
            diagonal.fill_(float("-inf"))
            positives = labels[rows, None] == labels[None, :]
            positives.diagonal(offset=start).fill_(False)
            n = positives.sum(1)
            pos_sum = torch.where(positives, s, 0.0).sum(1)
            log_normalizer = torch.logsumexp(s, dim=1)
            has_positive = n > 0
            n_safe = n.clamp(min=1)
            loss_sum += torch.where(has_positive, log_normalizer - pos_sum / n_safe, 0.0).sum()
            positive_sum[rows], negative_sum[rows] = pos_sum, row_total - pos_sum
            num_positives[rows], argmax[rows] = n, row_argmax(s)
            if grad is None:
                continue
            weight = has_positive.to(z.dtype)[:, None]
            g = s.sub_(log_normalizer[:, None]).exp_().mul_(weight)  # softmax, 0 on the diagonal
            g.sub_(positives * (weight / n_safe[:, None]))
            grad[rows].addmm_(g, z, alpha=1 / temperature)
            grad.addmm_(g.T, z[rows], alpha=1 / temperature)
        num_anchors = (num_positives > 0).sum()
        ctx.grad = None if grad is None else divide_by_count(grad, num_anchors)
        extras = (positive_sum, negative_sum, num_positives, argmax)
        ctx.mark_non_differentiable(*extras)
        ctx.set_materialize_grads(False)  # no zero gradients made for the non-differentiable outputs
        return (divide_by_count(loss_sum, num_anchors), *extras)

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_loss: Tensor | None, *_: Tensor | None
    ) -> tuple[Tensor | None, None, None, None, None]:
        return _scaled(ctx.grad, grad_loss), None, None, None, None


def _scaled(grad: Tensor | None, grad_loss: Tensor | None) -> Tensor | None:
    """A stored gradient times the loss's incoming one; None when either is (no grad mode, or no
    gradient reached the loss: the functions here do not materialize zero output gradients). Not in
    place: the stored gradient stays valid for another backward (``retain_graph=True``)."""
    return None if grad is None or grad_loss is None else grad * grad_loss


def _chunked(
    z: Tensor, labels: Tensor, temperature: float, chunk_size: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    need_grad = torch.is_grad_enabled() and z.requires_grad
    return _ChunkedSupCon.apply(z, labels, temperature, chunk_size, need_grad)


# ----------------------------------------------------------------------------------------------------
# margin contrastive loss (Hadsell, Chopra & LeCun 2006)
# ----------------------------------------------------------------------------------------------------


def _same_label_count(labels: Tensor) -> Tensor:
    r""":math:`\sum_{i,j} [y_i = y_j]` (the diagonal too) in :math:`O(N \log N)`, without an ``[N, N]``
    mask and without reading a value on the host: each label's run length in the sorted labels."""
    ordered = labels.sort().values
    run = torch.searchsorted(ordered, labels, right=True) - torch.searchsorted(ordered, labels)
    return run.sum()


class _FusedContrastive(torch.autograd.Function):
    r"""Margin contrastive loss of ``x [N, D]`` (float32/float64) with labels ``[N]``, a block of anchor
    rows at a time (``chunk_size`` rows, or :func:`row_blocks` of the ``[N, N]`` matrix when None), with
    the gradient written in the forward pass. Returns ``(loss, positive_loss, negative_loss,
    Σ_P d, Σ_N d, |P|, |N|)``; only ``loss`` is differentiable.

    With :math:`c = x - \bar x`, :math:`d^2_{ij} = \|c_i\|^2 + \|c_j\|^2 - 2 c_i^\top c_j` (clamped at
    0, exactly 0 on the diagonal) and :math:`h_{ij} = \max(0, m - d_{ij})`, the loss is a function of
    the symmetric matrix :math:`d^2`; with :math:`G_{ij} = \partial L / \partial d^2_{ij} =
    [y_i = y_j] / |P| - w\,[y_i \ne y_j]\,h_{ij} / (|N|\,d_{ij})` (0 where :math:`d_{ij} = 0`, as
    :func:`safe_sqrt` gives), :math:`\partial L/\partial c_i = 4 \sum_j G_{ij} (c_i - c_j)`: one
    matrix product per block, each row's gradient complete from its own block. The pair counts are known
    before the pass (:func:`_same_label_count`), so each block's :math:`G` is final when it is made.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        labels: Tensor,
        margin: float,
        negative_weight: float,
        chunk_size: int | None,
        need_distances: bool,
        need_grad: bool,
    ) -> tuple[Tensor, ...]:
        num_rows = len(x)
        centred = x - x.mean(dim=0, keepdim=True)
        squared_norms = centred.square().sum(-1)
        num_same = _same_label_count(labels)
        num_positive, num_negative = num_same - num_rows, num_rows * num_rows - num_same
        # G = a [same label] + b h / d: a and b stay on the device (no host read of the counts)
        a = divide_by_count(torch.ones((), dtype=x.dtype, device=x.device), num_positive)
        b = divide_by_count(torch.full((), -negative_weight, dtype=x.dtype, device=x.device), num_negative)
        sums = torch.zeros(4, dtype=x.dtype, device=x.device)  # Σ_P d², Σ_N h², Σ_P d, Σ_N d
        grad = torch.empty_like(x) if need_grad else None
        if chunk_size is None:
            blocks = row_blocks(num_rows, num_rows, x.device)
        else:
            blocks = [slice(s, min(s + chunk_size, num_rows)) for s in range(0, num_rows, chunk_size)]
        for block in blocks:
            rows = centred[block]
            squared = torch.addmm(squared_norms[None, :], rows, centred.T, alpha=-2)  # [k, N]
            squared.add_(squared_norms[block, None]).clamp_(min=0)
            squared.diagonal(offset=block.start).zero_()
            same = labels[block, None] == labels[None, :]
            sums[0] += torch.where(same, squared, 0.0).sum()
            distances = squared.sqrt_()
            if need_distances:
                positive_distance = torch.where(same, distances, 0.0).sum()
                sums[2:] += torch.stack([positive_distance, distances.sum() - positive_distance])
            hinge = torch.rsub(distances, margin).clamp_(min=0).masked_fill_(same, 0.0)
            sums[1] += torch.dot(hinge.view(-1), hinge.view(-1))
            if grad is None:
                continue
            # h / d: 0/0 on same-label pairs at d = 0 and m/0 on other ones at d = 0 both get 0
            pair_grad = torch.where(same, a, hinge.div_(distances).nan_to_num_(0.0, 0.0).mul_(b))
            torch.addmm(pair_grad.sum(1, keepdim=True) * rows, pair_grad, centred, alpha=-1, out=grad[block])
        if grad is not None:
            grad.mul_(4).sub_(grad.mean(dim=0, keepdim=True))  # through the centring (a no-op in exact math)
        positive_loss = divide_by_count(sums[0], num_positive)
        negative_loss = divide_by_count(sums[1], num_negative)
        loss = positive_loss + negative_weight * negative_loss
        ctx.grad = grad
        extras = (positive_loss, negative_loss, sums[2], sums[3], num_positive, num_negative)
        ctx.mark_non_differentiable(*extras)
        ctx.set_materialize_grads(False)  # no zero gradients made for the non-differentiable outputs
        return (loss, *extras)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: Tensor | None, *_: Tensor | None) -> tuple[Tensor | None, ...]:
        return _scaled(ctx.grad, grad_loss), None, None, None, None, None, None


@_without_autocast
def _contrastive(
    embeddings: Tensor,
    target: Tensor,
    margin: float,
    negative_weight: float,
    with_metrics: bool,
    chunk_size: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    check_floating("embeddings", embeddings)
    check_ndim("embeddings", embeddings, 2)
    _check_labels("target", target, "embeddings", embeddings)
    check_positive("margin", margin)
    check_positive("negative_weight", negative_weight, allow_zero=True)
    check_chunk_size(chunk_size)

    x = embeddings.to(compute_dtype(embeddings))
    if chunk_size is not None or fused_path():
        need_grad = torch.is_grad_enabled() and x.requires_grad
        (
            loss,
            positive_loss,
            negative_loss,
            positive_distance,
            negative_distance,
            num_positive,
            num_negative,
        ) = _FusedContrastive.apply(x, target, margin, negative_weight, chunk_size, with_metrics, need_grad)
        if not with_metrics:
            return loss, {}
        return loss, {
            "contrastive_loss": loss.detach(),
            "positive_loss": positive_loss,
            "negative_loss": negative_loss,
            "mean_positive_distance": divide_by_count(positive_distance, num_positive),
            "mean_negative_distance": divide_by_count(negative_distance, num_negative),
        }
    squared = pairwise_squared_distances(x)
    same_label = target[:, None] == target[None, :]
    not_self = ~torch.eye(len(target), dtype=torch.bool, device=target.device)
    positive_pairs = same_label & not_self
    negative_pairs = ~same_label
    num_positive = positive_pairs.sum()
    num_negative = negative_pairs.sum()

    distances = safe_sqrt(squared)
    positive_loss = divide_by_count(torch.where(positive_pairs, squared, 0.0).sum(), num_positive)
    hinge = F.relu(margin - distances).pow(2)
    negative_loss = divide_by_count(torch.where(negative_pairs, hinge, 0.0).sum(), num_negative)
    loss = positive_loss + negative_weight * negative_loss
    if not with_metrics:
        return loss, {}
    with torch.no_grad():
        metrics = {
            "contrastive_loss": loss.detach(),
            "positive_loss": positive_loss.detach(),
            "negative_loss": negative_loss.detach(),
            "mean_positive_distance": divide_by_count(
                torch.where(positive_pairs, distances, 0.0).sum(), num_positive
            ),
            "mean_negative_distance": divide_by_count(
                torch.where(negative_pairs, distances, 0.0).sum(), num_negative
            ),
        }
    return loss, metrics


def contrastive_loss(
    embeddings: Tensor,
    target: Tensor,
    *,
    margin: float = 1.0,
    negative_weight: float = 1.0,
    chunk_size: int | None = None,
) -> Tensor:
    r"""Margin contrastive loss over all pairs of a batch (Hadsell, Chopra & LeCun, CVPR 2006).

    With :math:`d_{ij} = \|x_i - x_j\|_2`, positive pairs :math:`\mathcal P = \{(i, j): i \ne j,
    y_i = y_j\}` and negative pairs :math:`\mathcal N = \{(i, j): y_i \ne y_j\}`:

    .. math::
        L = \frac{1}{|\mathcal P|} \sum_{\mathcal P} d_{ij}^2
          + w_- \frac{1}{|\mathcal N|} \sum_{\mathcal N} \max(0, m - d_{ij})^2

    A batch without positive (or negative) pairs gives 0 for that term, not NaN. Embeddings are used
    as they are (not normalized). Coinciding embeddings (:math:`d = 0`) have finite gradients: the
    positive term uses :math:`d^2` directly and :math:`d` is :func:`safe_sqrt` (gradient 0 at 0, where
    the hinge has no gradient). Distances come from the Gram matrix of the centred embeddings, as in
    :func:`pairwise_squared_distances` (no ``[N, N, D]`` tensor).

    Eager calls run a fused autograd function: it walks over blocks of anchor rows (on a CPU, blocks
    of about 1 MiB of the ``[N, N]`` matrix, which stay in cache; on a GPU, one block), computes each
    block's distances, loss terms and metrics and, in the same pass, its rows' gradient (one matrix
    product), so nothing ``[N, N]`` is kept for backward (first derivatives only). Under
    ``torch.compile`` without ``chunk_size`` the plain whole-matrix ops are traced instead.

    Args:
        embeddings: ``[N, D]`` floating (computed in float32, or float64 for float64 inputs).
        target: ``[N]`` integer class labels (any values; only equality matters).
        margin: :math:`m > 0`, the distance beyond which negative pairs cost nothing.
        negative_weight: :math:`w_- \ge 0`, the weight of the negative term.
        chunk_size: anchor rows per block of the fused function: memory
            :math:`O(\text{chunk} \cdot N + N D)` on any device. ``None`` (default) picks the block as
            above (on a GPU that is the whole ``[N, N]`` matrix: set it to bound memory there). Same
            result up to rounding.

    >>> embeddings = torch.tensor([[0.0, 0.0], [0.5, 0.0], [2.0, 0.0]])
    >>> contrastive_loss(embeddings, torch.tensor([0, 0, 1]), margin=2.0)  # 0.5² + (0² + 0.5²) / 2
    tensor(0.3750)
    >>> contrastive_loss(embeddings, torch.tensor([0, 0, 1]), margin=2.0, chunk_size=2)
    tensor(0.3750)
    """
    return _contrastive(embeddings, target, margin, negative_weight, False, chunk_size)[0]


def contrastive_loss_with_metrics(
    embeddings: Tensor,
    target: Tensor,
    *,
    margin: float = 1.0,
    negative_weight: float = 1.0,
    chunk_size: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """:func:`contrastive_loss` and its detached metrics: ``contrastive_loss`` (the loss),
    ``positive_loss``, ``negative_loss`` (unweighted), ``mean_positive_distance`` and
    ``mean_negative_distance`` (means of :math:`d` over the pairs; 0 without such pairs).

    >>> loss, metrics = contrastive_loss_with_metrics(torch.tensor([[0.0], [3.0]]), torch.tensor([0, 1]))
    >>> loss, metrics["mean_negative_distance"]
    (tensor(0.), tensor(3.))
    """
    return _contrastive(embeddings, target, margin, negative_weight, True, chunk_size)


# ----------------------------------------------------------------------------------------------------
# InfoNCE / NT-Xent (van den Oord et al. 2018; Chen et al. 2020)
# ----------------------------------------------------------------------------------------------------


_TRANSPOSED_ADD_MAX_BYTES = 4 << 20
"""Below this size of ``G`` the fused InfoNCE gradient takes ``(G + G^T) y``, one product, above it ``G y
+ G^T y``: adding ``G`` to its transpose reads one of them strided, which in cache is cheaper than a
second product (256 rows: 99 against 121 µs on this project's CPU; 768: 906 against 1064 µs) and out of
it far dearer (1024 rows: 4.2 against 1.9 ms; 2048: 17.4 against 7.3 ms)."""


def _positive_pairs(matrix: Tensor) -> Tensor:
    """The ``[2, N]`` view of a contiguous ``[2N, 2N]`` matrix's entries ``(i, i + N)`` (row 0) and ``(i +
    N, i)`` (row 1): both diagonals step by ``2N + 1``, so one strided view holds them (one op per
    fill, copy or read where two diagonals take two)."""
    num_rows = len(matrix)
    num_pairs = num_rows // 2
    first = matrix.storage_offset() + num_pairs  # (0, N); (N, 0) lies N·2N - N further on
    return matrix.as_strided((2, num_pairs), (num_pairs * num_rows - num_pairs, num_rows + 1), first)


class _WholeInfoNCE(torch.autograd.Function):
    r"""InfoNCE of the two views ``embeddings, positive_embeddings [N, D]``, stacked in ``dtype`` as rows
    ``z [M, D]`` (``M = 2N``; row :math:`i`'s positive is row :math:`(i + N) \bmod M`), from one ``[M, M]``
    matrix, the gradient written in the forward pass. Taking the views rather than ``z`` keeps the stack
    out of the autograd graph (no concatenation's backward node). Returns ``(loss,
    positive_logit_sum, hits, y)``, the middle two None without ``need_hits``; only ``loss`` is
    differentiable. ``hits [M]`` says whether the positive is the row's argmax (from the largest other
    logit; argmax itself only for tied rows); ``y`` is the rows the similarities are made of:
    ``F.normalize(z)`` with ``normalize``, else ``z``.

    With :math:`S = y y^\top`, :math:`s = S / \tau` (diagonal :math:`-\infty`) and :math:`p` its row
    softmax, :math:`\partial L / \partial S = (p - Y) / (M \tau)` with :math:`Y` the positives' one-hot
    rows, and since :math:`S` is :math:`y y^\top`, :math:`\partial L / \partial y = (G + G^\top) y /
    (M \tau)` with :math:`G = p - Y` made in place from the forward pass's softmax: one matrix product,
    or two for a large ``G`` (:data:`_TRANSPOSED_ADD_MAX_BYTES`). Through :math:`y = z / \max(\lVert z \rVert,
    \epsilon)`: :math:`\partial L/\partial z = (g - y\,(y \cdot g)) / \lVert z \rVert` per row (only
    :math:`g / \epsilon` where the norm is clamped), a few row operations where autograd's
    ``F.normalize`` backward takes a dozen.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        embeddings: Tensor,
        positive_embeddings: Tensor,
        dtype: torch.dtype,
        temperature: float,
        normalize: bool,
        need_hits: bool,
        need_grad: bool,
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        z = torch.cat([embeddings.to(dtype), positive_embeddings.to(dtype)])
        num_rows, num_pairs = len(z), len(z) // 2
        norms = z.norm(dim=1, keepdim=True) if normalize else None
        y = z / norms.clamp_min(_NORMALIZE_EPS) if norms is not None else z
        no_input = y.new_zeros(())  # addmm's input, ignored with beta=0: the scale goes into the product
        logits = torch.addmm(no_input, y, y.T, beta=0, alpha=1.0 / temperature)
        logits.fill_diagonal_(float("-inf"))
        positives = _positive_pairs(logits)
        # rows 0..N-1's positives' logits, then N..2N-1's: a copy (flatten would view a [2, 1] pair)
        positive_logits = positives.clone(memory_format=torch.contiguous_format).view(-1)
        hits = positive_logit_sum = None
        if need_hits:  # the largest other logit (positives masked for a moment) decides, not an argmax
            positives.fill_(float("-inf"))
            other_max = logits.amax(1)
            positives.copy_(positive_logits.view(2, num_pairs))
            hits = target_is_argmax(  # argmax for ties; their partners (i + N) mod 2N made only then
                logits, lambda rows: rows.add(num_pairs).remainder_(num_rows), positive_logits, other_max
            )
            row_max = torch.maximum(other_max, positive_logits)
            positive_logit_sum = positive_logits.sum()
        else:
            row_max = logits.amax(1)
        # One fused softmax kernel (on this CPU ~20 µs at 256 × 256 against ~55 µs for amax, subtract,
        # exp, sum and divide). Each row's largest probability is exp(0) / Σ exp(s - max), at least
        # 1 / M, so the row's log-sum-exp is its max minus the log of it, with no underflow however
        # small the positive's probability is.
        p = torch.softmax(logits, 1)
        loss = (row_max - p.amax(1).log_()).sub_(positive_logits).mean()
        grad = None
        if need_grad:
            g = p  # p - Y, in place
            _positive_pairs(g).sub_(1.0)
            scale = 1.0 / (num_rows * temperature)
            if g.numel() * g.element_size() < _TRANSPOSED_ADD_MAX_BYTES:
                grad = torch.addmm(no_input, torch.add(g, g.T), y, beta=0, alpha=scale)
            else:  # G y + G^T y as two products: the add's strided reads of G^T then cost more
                grad = torch.addmm(torch.mm(g, y), g.T, y, beta=scale, alpha=scale)
            if norms is not None:
                radial = torch.where(norms <= _NORMALIZE_EPS, 0.0, torch.linalg.vecdot(y, grad)[:, None])
                grad = grad.addcmul_(y, radial, value=-1.0).div_(norms.clamp_min_(_NORMALIZE_EPS))
        ctx.grad = grad
        ctx.view_dtypes = (embeddings.dtype, positive_embeddings.dtype)
        ctx.mark_non_differentiable(*(t for t in (positive_logit_sum, hits, y) if t is not None))
        ctx.set_materialize_grads(False)  # no zero gradients made for the non-differentiable outputs
        return loss, positive_logit_sum, hits, y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: Tensor | None, *_: Tensor | None) -> tuple[Tensor | None, ...]:
        grad = _scaled(ctx.grad, grad_loss)
        if grad is None:
            return (None,) * 8
        views = (view.to(dtype) for view, dtype in zip(grad.chunk(2), ctx.view_dtypes, strict=True))
        return *views, None, None, None, None, None, None


def _negative_similarity_sum(z: Tensor, positive_sum: Tensor, num_negatives: Tensor | int) -> Tensor:
    r"""``Σ z_i·z_j`` over the negative pairs of rows ``z [M, D]``: every pair's sum from ``[M, D]`` sums,
    :math:`\sum_{i \ne j} z_i \cdot z_j = \lVert \sum_i z_i \rVert^2 - \sum_i \lVert z_i \rVert^2` (no
    ``[M, M]`` pass), less the positives' ``positive_sum``. 0 without negatives, where the difference
    would be a rounding residue."""
    column_sum, flat = z.sum(0), z.flatten()
    total = torch.dot(column_sum, column_sum).sub_(torch.dot(flat, flat)).sub_(positive_sum)
    if isinstance(num_negatives, int):
        return total if num_negatives else total.zero_()
    return torch.where(num_negatives > 0, total, 0.0)


def _similarity_logits(z: Tensor, temperature: float, normalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(z', logits, not_self)``: normalized rows, ``z' z'^T / τ`` with ``-inf`` on the diagonal."""
    if normalize:
        z = F.normalize(z, dim=-1)
    not_self = ~torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = (z @ z.T / temperature).masked_fill(~not_self, float("-inf"))
    return z, logits, not_self


@_without_autocast
def _info_nce(
    embeddings: Tensor,
    positive_embeddings: Tensor,
    temperature: float,
    normalize: bool,
    with_metrics: bool,
    chunk_size: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    check_floating("embeddings", embeddings)
    check_floating("positive_embeddings", positive_embeddings)
    check_ndim("embeddings", embeddings, 2)
    check_same_shape("embeddings", embeddings, "positive_embeddings", positive_embeddings)
    check_positive("temperature", temperature)
    check_chunk_size(chunk_size)

    dtype = compute_dtype(embeddings, positive_embeddings)
    num_pairs = len(embeddings)
    num_negatives = 2 * num_pairs * (2 * num_pairs - 2)
    # Below FUSED_MIN_BYTES the whole matrix fits recycled heap memory: one fused function (the
    # stacking and normalization too). Above it (and on a GPU or under compile), s = z z^T / τ with
    # -inf on the diagonal, in place on the product (backward needs z, not s), then the cross-entropy
    # of each row against its partner's column, which on a CPU walks over blocks of rows (no [2N, 2N]
    # log-probs).
    if (
        chunk_size is None
        and num_pairs > 0
        and fused_path()
        and embeddings.device.type == "cpu"
        and (2 * num_pairs) ** 2 * dtype.itemsize < FUSED_MIN_BYTES
    ):
        need_grad = torch.is_grad_enabled() and (
            embeddings.requires_grad or positive_embeddings.requires_grad
        )
        loss, positive_logit_sum, hits, z = _WholeInfoNCE.apply(
            embeddings, positive_embeddings, dtype, temperature, normalize, with_metrics, need_grad
        )
        if not with_metrics:
            return loss, {}
        positive_sum = positive_logit_sum * temperature
    else:
        z = torch.cat([embeddings.to(dtype), positive_embeddings.to(dtype)])
        if chunk_size is not None:  # SupCon with the two views of pair i labelled i: one positive each
            if normalize:
                z = F.normalize(z, dim=-1)
            labels = torch.arange(num_pairs, device=z.device).repeat(2)
            loss, positive_sum, negative_sum, _, argmax = _chunked(z, labels, temperature, chunk_size)
            if not with_metrics:
                return loss, {}
            partner = (torch.arange(2 * num_pairs, device=z.device) + num_pairs) % (2 * num_pairs)
            return loss, {
                "accuracy": divide_by_count((argmax == partner).to(dtype).sum(), 2 * num_pairs),
                "mean_positive_similarity": divide_by_count(positive_sum.sum() * temperature, 2 * num_pairs),
                "mean_negative_similarity": divide_by_count(negative_sum.sum() * temperature, num_negatives),
            }
        if num_pairs == 0:  # no anchor: 0 with a zero gradient, as the chunked path gives
            loss = z.sum() * 0.0
            keys = ("accuracy", "mean_positive_similarity", "mean_negative_similarity")
            return loss, (dict.fromkeys(keys, loss.detach()) if with_metrics else {})
        if normalize:
            z = F.normalize(z, dim=-1)
        logits = torch.mm(z, z.T).div_(temperature).fill_diagonal_(float("-inf"))
        partner = (torch.arange(2 * num_pairs, device=z.device) + num_pairs) % (2 * num_pairs)  # 1 ↔ 2
        per_anchor, hits = per_row_cross_entropy(logits, partner, need_hits=with_metrics)
        loss = divide_by_count(per_anchor.sum(), 2 * num_pairs)
        if not with_metrics:
            return loss, {}
        with torch.no_grad():
            positive_sum = torch.dot(z[:num_pairs].flatten(), z[num_pairs:].flatten()) * 2
    with torch.no_grad():
        # similarities z_i·z_j (not over τ), from [2N, D] sums
        negative_sum = _negative_similarity_sum(z, positive_sum, num_negatives)
        metrics = {
            "accuracy": hits.mean(dtype=dtype),  # num_pairs > 0 here
            "mean_positive_similarity": positive_sum / (2 * num_pairs),
            "mean_negative_similarity": divide_by_count(negative_sum, num_negatives),
        }
    return loss, metrics


def info_nce_loss(
    embeddings: Tensor,
    positive_embeddings: Tensor,
    *,
    temperature: float = 0.1,
    normalize: bool = True,
    chunk_size: int | None = None,
) -> Tensor:
    r"""InfoNCE over two views, the NT-Xent loss of SimCLR (Chen et al., ICML 2020; van den Oord et al.
    2018, "Representation Learning with Contrastive Predictive Coding").

    The :math:`2N` rows :math:`z` of both views are anchors; the positive :math:`p(i)` of an anchor is
    its other view, the other :math:`2N - 2` rows are its negatives. With
    :math:`s_{ij} = z_i^\top z_j / \tau`:

    .. math::
        L = \frac{1}{2N} \sum_{i=1}^{2N} -\Big(s_{i,p(i)} - \log \sum_{k \ne i} e^{s_{ik}}\Big)

    computed with ``logsumexp`` (no overflow, no eps). With ``normalize=True`` (default) rows are
    L2-normalized first, so :math:`s` is the cosine similarity over :math:`\tau`; with ``False`` the raw
    dot products are used.

    Eager calls on a CPU with a ``[2N, 2N]`` matrix under 32 MiB (float32: ``N`` up to 1448) run one fused
    autograd function: a single product for the gradient where autograd takes two, written in the
    forward pass with the normalization's gradient (first derivatives only). Larger batches, GPUs and
    ``torch.compile`` take plain ops.

    Args:
        embeddings: ``[N, D]`` first view (floating; computed in float32, or float64).
        positive_embeddings: ``[N, D]`` second view; row ``i`` is the positive of row ``i``.
        temperature: :math:`\tau > 0`.
        normalize: L2-normalize the rows first.
        chunk_size: ``None`` (default) builds the whole ``[2N, 2N]`` similarity matrix; an integer walks
            over that many anchor rows at a time (memory :math:`O(\text{chunk} \cdot N)`, the gradient
            computed in the forward pass; eager only, no double backward). Same result up to rounding.

    >>> views = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> info_nce_loss(views, views, temperature=1.0)  # -log(e / (e + 2))
    tensor(0.5514)
    >>> info_nce_loss(views, views, temperature=1.0, chunk_size=1)
    tensor(0.5514)
    """
    return _info_nce(embeddings, positive_embeddings, temperature, normalize, False, chunk_size)[0]


def info_nce_loss_with_metrics(
    embeddings: Tensor,
    positive_embeddings: Tensor,
    *,
    temperature: float = 0.1,
    normalize: bool = True,
    chunk_size: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """:func:`info_nce_loss` and its detached metrics: ``accuracy`` (share of anchors whose most
    similar other row is their positive; among tied rows the first, as ``argmax``),
    ``mean_positive_similarity`` and ``mean_negative_similarity``
    (cosine similarities when normalized, dot products otherwise; not divided by τ).

    >>> views = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> info_nce_loss_with_metrics(views, views)[1]["accuracy"]
    tensor(1.)
    """
    return _info_nce(embeddings, positive_embeddings, temperature, normalize, True, chunk_size)


# ----------------------------------------------------------------------------------------------------
# supervised contrastive (Khosla et al. 2020)
# ----------------------------------------------------------------------------------------------------


@_without_autocast
def _supervised_contrastive(
    embeddings: Tensor,
    target: Tensor,
    temperature: float,
    normalize: bool,
    with_metrics: bool,
    chunk_size: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    check_floating("embeddings", embeddings)
    check_ndim("embeddings", embeddings, (2, 3))
    _check_labels("target", target, "embeddings", embeddings)
    check_positive("temperature", temperature)
    check_chunk_size(chunk_size)

    dtype = compute_dtype(embeddings)
    num_views = embeddings.shape[1] if embeddings.ndim == 3 else 1
    z = embeddings.reshape(embeddings.shape[0] * num_views, embeddings.shape[-1]).to(dtype)
    labels = target.repeat_interleave(num_views)  # row n·V + v is view v of sample n
    if len(z) < 2:  # one row: no pair at all (and a logsumexp over nothing), so 0 with zero gradient
        loss = (z * 0).sum()
        keys = ("anchors_with_positives", "mean_positive_similarity", "mean_negative_similarity")
        return loss, (dict.fromkeys(keys, loss.detach()) if with_metrics else {})

    if chunk_size is not None:
        if normalize:
            z = F.normalize(z, dim=-1)
        loss, positive_sum, negative_sum, num_positives, _ = _chunked(z, labels, temperature, chunk_size)
        if not with_metrics:
            return loss, {}
        num_pairs = len(z) * (len(z) - 1)
        total_positives = num_positives.sum()
        return loss, {
            "anchors_with_positives": (num_positives > 0).to(dtype).mean(),
            "mean_positive_similarity": divide_by_count(positive_sum.sum() * temperature, total_positives),
            "mean_negative_similarity": divide_by_count(
                negative_sum.sum() * temperature, num_pairs - total_positives
            ),
        }
    z, logits, not_self = _similarity_logits(z, temperature, normalize)
    positives = (labels[:, None] == labels[None, :]) & not_self
    num_positives = positives.sum(dim=1)
    has_positive = num_positives > 0
    # Σ_{p∈P(i)} log_softmax_ip = Σ_{p∈P(i)} s_ip − |P(i)| · logsumexp_{a≠i} s_ia (no [M, M] log-prob)
    positive_logit_sum = torch.where(positives, logits, 0.0).sum(dim=1)
    log_normalizer = torch.logsumexp(logits, dim=1)
    mean_log_prob = (positive_logit_sum - num_positives * log_normalizer) / num_positives.clamp(min=1)
    per_anchor = torch.where(has_positive, -mean_log_prob, 0.0)
    loss = divide_by_count(per_anchor.sum(), has_positive.sum())
    if not with_metrics:
        return loss, {}
    with torch.no_grad():
        # no [M, M] pass: the positives' sum is the loss's (see `_negative_similarity_sum`)
        total_positives = num_positives.sum()
        positive_sum = positive_logit_sum.sum() * temperature
        num_negatives = len(z) * (len(z) - 1) - total_positives
        negative_sum = _negative_similarity_sum(z, positive_sum, num_negatives)
        metrics = {
            "anchors_with_positives": has_positive.to(dtype).mean(),
            "mean_positive_similarity": divide_by_count(positive_sum, total_positives),
            "mean_negative_similarity": divide_by_count(negative_sum, num_negatives),
        }
    return loss, metrics


def supervised_contrastive_loss(
    embeddings: Tensor,
    target: Tensor,
    *,
    temperature: float = 0.1,
    normalize: bool = True,
    chunk_size: int | None = None,
) -> Tensor:
    r"""Supervised contrastive loss, the :math:`\mathcal L^{sup}_{out}` form of Khosla et al.,
    "Supervised Contrastive Learning", NeurIPS 2020.

    The :math:`M = N V` rows (every view of every sample) are anchors. For anchor :math:`i`,
    :math:`A(i)` is every other row and :math:`P(i) = \{p \in A(i): y_p = y_i\}` its positives (its
    other views and the views of same-label samples). With :math:`s_{ij} = z_i^\top z_j / \tau`:

    .. math::
        L = \frac{1}{|I^+|} \sum_{i \in I^+} \frac{-1}{|P(i)|} \sum_{p \in P(i)}
            \Big(s_{ip} - \log \sum_{a \in A(i)} e^{s_{ia}}\Big)

    where :math:`I^+` are the anchors with at least one positive; the others do not count. A batch
    without any positive pair gives 0 with a zero gradient. Computed with ``logsumexp``. With
    ``normalize=True`` (default) rows are L2-normalized first (cosine similarity, as in the paper).
    Two views and all labels distinct is :func:`info_nce_loss` (SimCLR). The official code's extra
    factor ``temperature / base_temperature`` is left out (it is 1 at its defaults).

    Args:
        embeddings: ``[N, D]`` or ``[N, V, D]`` (``V`` views per sample), floating.
        target: ``[N]`` integer class labels (any values; only equality matters).
        temperature: :math:`\tau > 0`.
        normalize: L2-normalize the rows first.
        chunk_size: ``None`` (default) builds the whole ``[M, M]`` similarity matrix; an integer walks
            over that many anchor rows at a time: memory :math:`O(\text{chunk} \cdot M + M D)`
            instead of several ``[M, M]`` tensors, the gradient computed in the forward pass (eager only,
            no double backward). Same result up to rounding.

    >>> embeddings = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    >>> supervised_contrastive_loss(embeddings, torch.tensor([0, 0, 1]), temperature=1.0)  # log(1 + e⁻¹)
    tensor(0.3133)
    >>> supervised_contrastive_loss(embeddings, torch.tensor([0, 0, 1]), temperature=1.0, chunk_size=2)
    tensor(0.3133)
    """
    return _supervised_contrastive(embeddings, target, temperature, normalize, False, chunk_size)[0]


def supervised_contrastive_loss_with_metrics(
    embeddings: Tensor,
    target: Tensor,
    *,
    temperature: float = 0.1,
    normalize: bool = True,
    chunk_size: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """:func:`supervised_contrastive_loss` and its detached metrics: ``anchors_with_positives`` (the
    share of anchors that count), ``mean_positive_similarity`` and ``mean_negative_similarity``
    (over all positive / negative pairs; cosine when normalized, not divided by τ).

    >>> embeddings = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    >>> loss, metrics = supervised_contrastive_loss_with_metrics(embeddings, torch.tensor([0, 0, 1]))
    >>> metrics["anchors_with_positives"], metrics["mean_negative_similarity"]
    (tensor(0.6667), tensor(0.))
    """
    return _supervised_contrastive(embeddings, target, temperature, normalize, True, chunk_size)
