"""One shared tester for every loss: subclass ``LossTester`` and fill in what is particular to the loss.

The common checks, run for every entry of ``option_sets``:

- the functional against an independent ``reference`` (computed in float64) at fp32 and fp64;
- ``torch.autograd.gradcheck`` in fp64 on the inputs named in ``grad_inputs``;
- bf16 inputs within ``bf16_rtol`` of the fp32 result;
- an all-masked input (``mask_input``) gives exactly 0 and a zero gradient;
- the module returns ``LossOutput`` equal to the functional, with detached 0-dim metrics;
- the loss's config in ``configs/`` (``config``) parses with ``--print_config``;
- on ``meta`` tensors (no data), the paths an accelerator takes: a forward, backward and metric update
  make no host read and move no CPU data to the device (``tests.helpers.no_host_to_device``);
- on CUDA (skipped without it): a forward, backward and metric update make no host-device sync
  (``torch.cuda.set_sync_debug_mode("error")``), and the functional with fp32 and bf16 inputs gives the
  CPU's fp32 loss and gradients.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor, nn

from lightning_losses import LossOutput
from tests.helpers import no_host_to_device

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def cast_floating(inputs: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    return {
        k: v.to(dtype) if isinstance(v, Tensor) and v.is_floating_point() else v for k, v in inputs.items()
    }


def _to_device(value: Any, device: str) -> Any:
    return value.to(device) if isinstance(value, (Tensor, nn.Module)) else value


def _to_cuda(value: Any) -> Any:
    return _to_device(value, "cuda")


@contextlib.contextmanager
def _cuda_syncs_raise() -> Iterator[None]:
    """A host-device sync inside raises (``torch.cuda.set_sync_debug_mode("error")``)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def loss_of(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


class LossTester:
    """Base class of a loss's test class (``class TestFocal(LossTester): ...``)."""

    functional: ClassVar[Callable[..., Any]]
    module_class: ClassVar[type[nn.Module]]
    option_sets: ClassVar[list[dict[str, Any]]] = [{}]
    grad_inputs: ClassVar[tuple[str, ...]] = ()
    mask_input: ClassVar[str | None] = None
    bf16_rtol: ClassVar[float] = 2e-2
    fp32_rtol: ClassVar[float] = 1e-5
    config: ClassVar[str | None] = None

    def make_inputs(self, dtype: torch.dtype, seed: int) -> dict[str, Any]:
        """Tensor inputs, passed by keyword to the functional and to the module's forward."""
        raise NotImplementedError

    def reference(self, **inputs_and_options: Any) -> Tensor:
        """The independent reference value, computed from float64 inputs."""
        raise NotImplementedError

    # -- adapters a subclass may override ----------------------------------------------------------

    def call_functional(self, inputs: dict[str, Any], options: dict[str, Any]) -> Tensor:
        return loss_of(type(self).functional(**inputs, **options))

    def build_module(self, options: dict[str, Any]) -> nn.Module:
        return self.module_class(**options)

    def module_inputs(self, module: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        """The module's forward inputs that match the functional's ``inputs`` (it may also set the
        module's state, e.g. learned parameters the functional takes as an input)."""
        return inputs

    def functional_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Module options as the functional takes them (e.g. lists turned into tensors)."""
        return options

    # -- the common checks -------------------------------------------------------------------------

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
    def test_matches_reference(self, dtype):
        for index, options in enumerate(self.option_sets):
            inputs = self.make_inputs(dtype, seed=index)
            expected = self.reference(**cast_floating(inputs, torch.float64), **options)
            actual = self.call_functional(inputs, self.functional_options(options))
            rtol = self.fp32_rtol if dtype == torch.float32 else 1e-10
            torch.testing.assert_close(
                actual.double(), expected.double(), rtol=rtol, atol=rtol, msg=str(options)
            )

    def test_gradcheck(self):
        for index, options in enumerate(self.option_sets):
            inputs = self.make_inputs(torch.float64, seed=index)
            names = [n for n in self.grad_inputs if n in inputs]
            fixed = {k: v for k, v in inputs.items() if k not in names}

            def fn(*tensors, fixed=fixed, names=names, options=options):
                return self.call_functional(
                    fixed | dict(zip(names, tensors, strict=True)), self.functional_options(options)
                )

            tensors = tuple(inputs[n].detach().requires_grad_() for n in names)
            assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-5), options

    def test_bf16_close_to_fp32(self):
        for index, options in enumerate(self.option_sets):
            inputs = self.make_inputs(torch.float32, seed=index)
            fp32 = self.call_functional(inputs, self.functional_options(options))
            bf16 = self.call_functional(
                cast_floating(inputs, torch.bfloat16), self.functional_options(options)
            )
            assert bf16.dtype == torch.float32, "losses compute in float32 from bf16 inputs"
            torch.testing.assert_close(bf16, fp32, rtol=self.bf16_rtol, atol=self.bf16_rtol, msg=str(options))

    def test_all_masked_is_exactly_zero(self):
        if self.mask_input is None:
            pytest.skip("this loss takes no mask")
        for index, options in enumerate(self.option_sets):
            inputs = self.make_inputs(torch.float32, seed=index)
            inputs[self.mask_input] = torch.zeros_like(inputs[self.mask_input])
            grads = {n: inputs[n].detach().requires_grad_() for n in self.grad_inputs if n in inputs}
            loss = self.call_functional(inputs | grads, self.functional_options(options))
            assert loss.item() == 0.0, options
            loss.backward()
            for name, tensor in grads.items():
                assert tensor.grad is not None and torch.count_nonzero(tensor.grad) == 0, (name, options)

    def test_module_matches_functional(self):
        for index, options in enumerate(self.option_sets):
            inputs = self.make_inputs(torch.float32, seed=index)
            module = self.build_module(options)
            output = module(**self.module_inputs(module, inputs))
            assert isinstance(output, LossOutput)
            expected = self.call_functional(inputs, self.functional_options(options))
            torch.testing.assert_close(output.loss, expected, msg=str(options))
            assert output.loss.ndim == 0
            for key, value in output.metrics.items():
                assert isinstance(value, Tensor) and value.ndim == 0 and not value.requires_grad, key

    def _guarded_steps(
        self, device: str, dtype: torch.dtype, guard: Callable[[], contextlib.AbstractContextManager]
    ) -> Iterator[tuple[dict[str, Any], Tensor, dict[str, Any]]]:
        """Per option set, the module's forward, backward and metric aggregation on ``device`` inside
        ``guard()``; yields ``(options, loss, inputs)``."""
        from lightning_losses import MetricAggregator

        for index, options in enumerate(self.option_sets):
            made = cast_floating(self.make_inputs(torch.float32, seed=index), dtype)
            inputs = {k: _to_device(v, device) for k, v in made.items()}
            for name in self.grad_inputs:
                if name in inputs:
                    inputs[name] = inputs[name].detach().requires_grad_()
            module = self.build_module(options).to(device)
            aggregator = MetricAggregator()
            with guard():
                loss, metrics = module(**self.module_inputs(module, inputs))
                if loss.requires_grad:
                    loss.backward()
                aggregator.update(metrics, 8)
            yield options, loss, inputs

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
    def test_no_host_read_off_the_cpu(self, dtype):
        """Forward, backward and the metric aggregation on ``meta`` tensors, which hold no data: any host
        read (``.item()``, ``float``/``bool`` of a tensor, ``nonzero``, boolean indexing, a copy to the
        CPU) raises, and so does CPU data moved to them, under :func:`~tests.helpers.no_host_to_device`. It
        takes the paths an accelerator takes (no CPU value checks, no finite-form host reads), so it checks
        on every machine what ``test_no_host_sync_on_cuda`` checks on a GPU."""
        for options, loss, inputs in self._guarded_steps("meta", dtype, no_host_to_device):
            assert loss.is_meta and loss.ndim == 0 and loss.dtype == torch.float32, options
            for name in self.grad_inputs:
                if name in inputs and inputs[name].grad is not None:
                    assert inputs[name].grad.shape == inputs[name].shape, (name, options)

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    def test_no_host_sync_on_cuda(self):
        """Forward, backward and the metric aggregation of a step make no host-device sync."""
        for options, loss, _ in self._guarded_steps("cuda", torch.float32, _cuda_syncs_raise):
            assert loss.is_cuda, options

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    def test_cuda_matches_cpu(self):
        """The functional on CUDA (fp32 and bf16 inputs) gives the CPU fp32 loss and gradients."""
        for index, options in enumerate(self.option_sets):
            inputs = self.make_inputs(torch.float32, seed=index)
            functional_options = self.functional_options(options)
            expected, expected_grads = self._loss_and_grads(inputs, functional_options)
            cuda_options = {k: _to_cuda(v) for k, v in functional_options.items()}
            for dtype, rtol in ((torch.float32, 1e-4), (torch.bfloat16, self.bf16_rtol)):
                cuda_inputs = {k: _to_cuda(v) for k, v in cast_floating(inputs, dtype).items()}
                loss, grads = self._loss_and_grads(cuda_inputs, cuda_options)
                assert loss.is_cuda and loss.dtype == torch.float32, (loss.device, loss.dtype)
                msg = f"{options} {dtype}"
                torch.testing.assert_close(loss.cpu(), expected, rtol=rtol, atol=rtol, msg=msg)
                for name, grad in grads.items():
                    torch.testing.assert_close(
                        grad.float().cpu(), expected_grads[name], rtol=rtol, atol=rtol, msg=f"{name} {msg}"
                    )

    def _loss_and_grads(
        self, inputs: dict[str, Any], options: dict[str, Any]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        leaves = {n: inputs[n].detach().requires_grad_() for n in self.grad_inputs if n in inputs}
        loss = self.call_functional(inputs | leaves, options)
        if not leaves:
            return loss.detach(), {}
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        return loss.detach(), {
            n: g if g is not None else torch.zeros_like(leaves[n]) for n, g in zip(leaves, grads, strict=True)
        }

    def test_config_prints(self, capsys):
        if self.config is None:
            pytest.skip("no config for this loss")
        from lightning_losses.cli import build_cli

        with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
            build_cli(["fit", "--config", str(CONFIGS / self.config), "--print_config"])
        assert "class_path" in capsys.readouterr().out
