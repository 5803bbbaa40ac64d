"""Models whose outputs are objects: an object with ``.logits`` and Hugging Face causal LMs."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_losses import LossModule
from lightning_losses.losses import CrossEntropyLoss, NLLLoss
from tests.helpers import TinyLM, quiet_trainer


@dataclass
class CausalLMOutput:
    logits: Tensor
    hidden: Tensor | None = None


class ObjectOutputLM(TinyLM):
    """TinyLM returning an object with a ``.logits`` attribute (not a dict)."""

    def forward(self, input_ids: Tensor) -> CausalLMOutput:  # type: ignore[override]
        return CausalLMOutput(super().forward(input_ids)["next_token_logits"])


def lm_batch() -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 7, (4, 6), generator=generator)
    token_mask = torch.arange(6)[None, :] < torch.tensor([6, 3, 5, 2])[:, None]
    return {"input_ids": input_ids, "token_mask": token_mask}


def test_an_object_with_logits_is_read_like_a_dict():
    torch.manual_seed(0)
    module = LossModule(ObjectOutputLM(), NLLLoss(), input_map={"next_token_logits": "logits"})
    batch = lm_batch()
    loss = module._step(batch).loss
    torch.manual_seed(0)
    plain = LossModule(TinyLM(), NLLLoss())
    torch.testing.assert_close(loss, plain._step(batch).loss)
    with pytest.raises(TypeError, match="tensor attribute `preds`"):
        LossModule(ObjectOutputLM(), NLLLoss(), output_key="preds")(batch)


def test_a_tiny_hugging_face_causal_lm_trains_unchanged():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=7,
        n_positions=8,
        n_embd=16,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    module = LossModule(
        model,
        NLLLoss(),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-2),
        input_map={"next_token_logits": "logits"},
        model_input_map={"attention_mask": "token_mask"},
    )
    batch = lm_batch()
    # the loss equals a by-hand NLL of the model's shifted logits over the masked tokens
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["token_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    scored = batch["token_mask"][:, 1:]
    expected = -(logp * scored).sum() / scored.sum()
    torch.testing.assert_close(module._step(batch).loss.double(), expected, rtol=1e-5, atol=1e-6)

    trainer = quiet_trainer(max_epochs=30)
    trainer.fit(module, DataLoader([batch], batch_size=None))
    assert trainer.callback_metrics["train/loss"] < 0.5 * expected  # it learns the batch


class ConvBackbone(nn.Module):
    """A torchvision-style classifier: ``forward(x)`` on images, logits out."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


class KeywordDictModel(nn.Module):
    """A model with keyword inputs returning a dict, as many research codebases write them."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 3)

    def forward(self, *, features: Tensor, temperature: float = 1.0) -> dict[str, Tensor]:
        return {"scores": self.proj(features) / temperature, "norm": features.norm(dim=-1)}


def test_existing_models_are_wrapped_without_a_subclass():
    generator = torch.Generator().manual_seed(0)
    images, labels = (
        torch.randn(16, 1, 8, 8, generator=generator),
        torch.randint(0, 3, (16,), generator=generator),
    )
    torch.manual_seed(0)
    backbone = ConvBackbone()
    module = LossModule(
        backbone, CrossEntropyLoss()
    )  # a tuple batch: (inputs, target); the tensor is "logits"
    loss = module._step((images, labels)).loss
    torch.testing.assert_close(loss, nn.functional.cross_entropy(backbone(images), labels))
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(module, DataLoader(TensorDataset(images, labels), batch_size=8))
    assert trainer.global_step == 2

    model = KeywordDictModel()
    batch = {"features": torch.randn(5, 4, generator=generator), "target": torch.randint(0, 3, (5,))}
    keyword = LossModule(model, CrossEntropyLoss(), input_map={"logits": "scores"})
    step = keyword._step(batch)
    assert set(step.outputs) == {"scores", "norm"}
    torch.testing.assert_close(
        step.loss, nn.functional.cross_entropy(model(features=batch["features"])["scores"], batch["target"])
    )
