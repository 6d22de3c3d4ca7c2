"""PyTorch backend: the checkpoint through the project's model definitions (the reference path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from convert.errors import ToolchainError
from convert.spec import ModelSpec
from infer.base import InputSpec, Runner


class TorchRunner(Runner):
    """Runs a .pth checkpoint in PyTorch eager mode.

    Args:
        checkpoint: the .pth file.
        spec: model description (``convert.spec.spec_for_arch``).
        device: ``"cpu"`` or ``"cuda"``.
        layout, gate_order: see ``convert.checkpoint.load_checkpoint``.
    """

    name = "torch"
    requires = "torch"

    def __init__(self, checkpoint: str | Path, spec: ModelSpec, device: str = "cpu",
                 layout: str = "auto", gate_order: str = "ifgo"):
        super().__init__()
        self.checkpoint, self.spec, self.device = Path(checkpoint), spec, device
        self.layout, self.gate_order = layout, gate_order
        self.model = None

    def _load(self) -> None:
        import torch

        from convert.checkpoint import load_checkpoint

        if self.device == "cuda" and not torch.cuda.is_available():
            raise ToolchainError("--torch-device cuda asked for, but torch sees no CUDA device")
        model = load_checkpoint(self.checkpoint, self.spec, self.layout, self.gate_order)
        self.model = model.to(self.device)
        self._torch = torch

    def input_specs(self) -> list[InputSpec]:
        return [InputSpec("imgs", np.dtype(np.float32),
                          (None, self.spec.channels, self.spec.height, None),
                          {3: (self.spec.MIN_INPUT_WIDTH, 1 << 20)})]

    def _run(self, imgs: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            logits = self.model(torch.from_numpy(imgs).to(self.device))
            if self.device == "cuda":
                torch.cuda.synchronize()
        return logits.cpu().numpy()

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"output1": self._timed(self._run, feed["imgs"])}

    def _close(self) -> None:
        self.model = None
