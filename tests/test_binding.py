import pytest
from torch import nn

from lightning_losses.binding import Binding, callable_signature
from tests.helpers import GuideProtocolLoss


class PositionalOnly(nn.Module):
    def forward(self, a, /, b, c=3):
        return a + b + c


def test_binds_by_name_with_defaults_and_positional_only():
    binding = Binding(PositionalOnly())
    args, kwargs = binding.bind([{"a": 1}, {"b": 2, "extra": 9}])
    assert args == [1] and kwargs == {"b": 2}
    assert PositionalOnly()(*args, **kwargs) == 6


def test_rename_map_and_source_order():
    binding = Binding(nn.MSELoss(), rename={"input": "preds"})
    _, kwargs = binding.bind([{"preds": "outputs-wins", "target": "from-outputs"}, {"target": "batch"}])
    assert kwargs == {"input": "outputs-wins", "target": "from-outputs"}


def test_missing_input_error_names_parameter_loss_and_available_keys():
    binding = Binding(nn.MSELoss())
    with pytest.raises(ValueError) as info:
        binding.bind([{"logits": 0}, {"inputs": 0, "target": 1}])
    message = str(info.value)
    assert "MSELoss needs the input `input`" in message
    assert "['logits']" in message and "['inputs', 'target']" in message
    assert "rename map" in message


def test_unknown_rename_key_is_rejected():
    with pytest.raises(ValueError, match=r"names \['inputt'\], which are not parameters of MSELoss"):
        Binding(nn.MSELoss(), rename={"inputt": "logits"})


def test_call_override_signature_is_used_for_guide_protocol():
    names = list(callable_signature(GuideProtocolLoss({})).parameters)
    assert names == ["next_token_logits", "data", "global_valid_seqs", "global_valid_toks"]


def test_special_names_win_unless_renamed():
    class WantsData(nn.Module):
        def forward(self, data, model):
            return data

    special = {"data": "the batch", "model": "the model"}
    _, kwargs = Binding(WantsData()).bind([{"data": "an output"}], special=special)
    assert kwargs == {"data": "the batch", "model": "the model"}
    _, kwargs = Binding(WantsData(), rename={"data": "x"}).bind([{"x": "renamed"}], special=special)
    assert kwargs == {"data": "renamed", "model": "the model"}
