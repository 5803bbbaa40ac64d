import pytest
import torch
from torch import nn

from lightning_losses import LossFunction, LossOutput, LossType, set_value_checks
from lightning_losses.protocol import (
    check_class_targets,
    check_finite,
    check_floating,
    check_mask,
    check_ndim,
    check_same_leading_dims,
    check_same_shape,
    split_output,
    value_checks_enabled,
)
from tests.helpers import GuideProtocolLoss


def test_loss_output_unpacks_like_a_pair():
    out = LossOutput(torch.tensor(1.0), {"a": torch.tensor(2.0)})
    loss, metrics = out
    assert loss == 1.0 and metrics["a"] == 2.0
    assert LossType("token_level") is LossType.TOKEN_LEVEL


def test_guide_protocol_subclass_is_a_working_module():
    loss_fn = GuideProtocolLoss({"alpha": 2.0})
    # nn.Module.__init__ ran although the subclass never called super().__init__()
    assert isinstance(loss_fn, nn.Module) and loss_fn.state_dict() == {}
    loss_fn.register_buffer("seen", torch.zeros(()))
    logits = torch.zeros(1, 2, 4, requires_grad=True)
    data = {"input_ids": torch.tensor([[1, 3]]), "token_mask": torch.tensor([[1.0, 0.0]])}
    loss, _ = loss_fn(logits, data, torch.tensor(1), torch.tensor(1))
    # uniform logits over 4 tokens: nll = log 4 for the one valid token, times alpha = 2
    torch.testing.assert_close(loss, 2 * torch.log(torch.tensor(4.0)))
    loss.backward()
    assert logits.grad[0, 1].abs().sum() == 0  # the masked token has no gradient
    assert loss_fn.loss_type is LossType.TOKEN_LEVEL


def test_loss_function_with_regular_init_and_forward():
    class Scaled(LossFunction):
        def __init__(self, scale: float) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(scale))

        def forward(self, x):
            return LossOutput(self.scale * x.sum(), {})

    fn = Scaled(3.0)
    assert fn(torch.ones(2)).loss == 6.0
    assert [n for n, _ in fn.named_parameters()] == ["scale"]


def test_split_output_accepts_tensor_pair_and_float_metrics():
    loss = torch.tensor(2.0, requires_grad=True)
    bare = split_output(loss)
    assert bare.metrics.keys() == {"loss"} and not bare.metrics["loss"].requires_grad
    pair = split_output((loss, {"acc": 0.5, "n": 3}))
    assert pair.metrics["acc"].item() == 0.5 and pair.metrics["n"].ndim == 0
    assert pair.metrics["loss"] == 2.0
    with pytest.raises(TypeError, match="tensor or a"):
        split_output([loss])
    with pytest.raises(ValueError, match="scalar"):
        split_output((loss, {"bad": torch.ones(3)}))
    # numbers are made on the loss's device (a CPU tensor moved there would be a host-device sync)
    on_meta = split_output((torch.zeros((), device="meta"), {"acc": 0.5}))
    assert on_meta.metrics["acc"].device.type == "meta" and on_meta.metrics["acc"].dtype == torch.float32


def test_shape_and_dtype_checks_name_the_argument():
    with pytest.raises(TypeError, match="`logits` must be a floating-point tensor.*torch.int64"):
        check_floating("logits", torch.ones(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`logits` must have 2 or 3 dimensions, got shape \(4,\)"):
        check_ndim("logits", torch.ones(4), (2, 3))
    with pytest.raises(ValueError, match=r"`a` and `b` must have the same shape, got \(2,\) and \(3,\)"):
        check_same_shape("a", torch.ones(2), "b", torch.ones(3))
    with pytest.raises(ValueError, match=r"`x` and `y` must match, got shapes \(2, 3\) and \(3, 3\)"):
        check_same_leading_dims("x", torch.ones(2, 3), "y", torch.ones(3, 3), 1)
    with pytest.raises(ValueError, match=r"`mask` must have shape \(2, 3\), got shape \(2,\)"):
        check_mask("mask", torch.ones(2), (2, 3))


def test_class_target_checks():
    with pytest.raises(TypeError, match="`target` must hold integer class indices"):
        check_class_targets("target", torch.zeros(3), 4)
    with pytest.raises(ValueError, match=r"`target` must lie in \[0, 4\).*got values in \[0, 7\]"):
        check_class_targets("target", torch.tensor([0, 7]), 4)
    check_class_targets("target", torch.tensor([0, -100, 3]), 4, ignore_index=-100)
    with pytest.raises(ValueError, match="other than ignore_index=-100"):
        check_class_targets("target", torch.tensor([-1, -100]), 4, ignore_index=-100)


def test_finite_check_and_value_check_switch():
    bad = torch.tensor([1.0, float("nan"), float("inf")])
    with pytest.raises(ValueError, match="`x` holds 2 non-finite value"):
        check_finite("x", bad)
    try:
        set_value_checks("never")
        assert not value_checks_enabled(bad)
        check_finite("x", bad)  # skipped: no error
        set_value_checks("always")
        assert value_checks_enabled(bad)
    finally:
        set_value_checks("auto")
    with pytest.raises(ValueError, match="`mode` must be"):
        set_value_checks("sometimes")
