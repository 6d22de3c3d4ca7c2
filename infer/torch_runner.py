"""PyTorch backend: a checkpoint through the project's model definitions (the reference path),
or a live ``torch.nn.Module`` (:meth:`TorchRunner.from_module`: training's validation, the
export check)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.errors import ToolchainError
from infer.base import InputSpec, Runner
from infer.device import parse_device
from models.spec import ModelSpec


class TorchRunner(Runner):
    """Runs a .pth checkpoint in PyTorch eager mode.

    Args:
        checkpoint: the .pth file.
        spec: model description (``models.registry.spec_for_arch``); names the input and
            output tensors and gives the input's channels and height.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        rnn_layout, gate_order, trust: see ``models.checkpoint.load_checkpoint``.
        threads: CPU threads for PyTorch's ops (``torch.set_num_threads``, process-wide);
            None: PyTorch's default.
    """

    name = "torch"
    requires = "torch"
    engine_errors = (RuntimeError,)  # torch raises RuntimeError for shape and kernel failures

    @classmethod
    def from_file(cls, path, spec, device, options):
        """See :meth:`infer.base.Runner.from_file`."""
        return cls(path, spec, str(device), options.rnn_layout, options.gate_order, options.trust,
                   options.threads)

    @classmethod
    def from_module(cls, module, spec: ModelSpec) -> TorchRunner:
        """A runner over a live ``torch.nn.Module`` that outputs ``spec``'s logits, on the
        device its parameters are on. Loading does not copy, move or reload it; the runner
        puts it in eval mode and runs it under ``torch.inference_mode``; closing drops the
        runner's reference only.
        """
        device = str(next(module.parameters()).device)
        runner = cls(f"<module {type(module).__name__}>", spec,
                     "cpu" if device == "cpu" else device)
        runner._module = module
        return runner

    def __init__(self, checkpoint: str | Path, spec: ModelSpec, device: str = "cpu",
                 rnn_layout: str = "auto", gate_order: str = "ifgo", trust: bool = False,
                 threads: int | None = None):
        super().__init__()
        parsed = parse_device(device)
        if parsed.kind not in ("cpu", "cuda"):
            raise ToolchainError(f"device {device!r}: PyTorch runs here on cpu or cuda[:N]")
        self.checkpoint, self.spec, self._device = Path(checkpoint), spec, parsed
        self.rnn_layout, self.gate_order, self.trust = rnn_layout, gate_order, trust
        self.threads = threads
        self.model = None
        self._module = None  # a live module (from_module), used instead of the checkpoint

    @property
    def device(self) -> str:
        """The device, spelled as ``infer.device`` spells it (``cpu``, ``cuda``, ``cuda:N``)."""
        return str(self._device)

    def _load(self) -> None:
        import torch

        from models.checkpoint import load_checkpoint

        if self._device.kind == "cuda":
            if not torch.cuda.is_available():
                raise ToolchainError(f"device {self.device} asked for, but torch sees no CUDA "
                                     "device")
            if self._device.ordinal >= torch.cuda.device_count():
                raise ToolchainError(f"device {self.device} asked for, but torch sees "
                                     f"{torch.cuda.device_count()} CUDA device(s)")
        self._torch = torch
        if self._module is not None:
            self.model = self._module.eval()
            return
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        model = load_checkpoint(self.checkpoint, self.spec, self.rnn_layout, self.gate_order,
                                self.trust)
        self.model = model.to(self.device)

    def input_specs(self) -> list[InputSpec]:
        spec = self.spec
        return [InputSpec(spec.input_name, np.dtype(np.float32),
                          (None, spec.channels, spec.height, None),
                          {3: (spec.min_input_width, 1 << 20)})]

    def _run(self, images: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            scores = self.model(torch.from_numpy(images).to(self.device))
            if self._device.kind == "cuda":
                torch.cuda.synchronize(self.device)
        return scores.float().cpu().numpy()

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {self.spec.output_name: self._timed(self._run, feed[self.spec.input_name])}

    def _close(self) -> None:
        self.model = None
