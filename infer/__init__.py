"""Inference backends: one small runner per engine, by name, and opening a model by its file.

Engines are imported only when a runner loads, so this package imports on machines without
ais_bench, CUDA or even torch.
"""

from infer.ais_bench_runner import AisBenchRunner
from infer.base import InputSpec, Runner
from infer.onnxruntime_runner import OnnxRuntimeRunner
from infer.open import describe, open_model, parse_device
from infer.torch_runner import TorchRunner

BACKENDS: dict[str, type[Runner]] = {
    "onnxruntime": OnnxRuntimeRunner,
    "ais_bench": AisBenchRunner,
    "torch": TorchRunner,
}

__all__ = ["BACKENDS", "AisBenchRunner", "InputSpec", "OnnxRuntimeRunner", "Runner", "TorchRunner",
           "describe", "open_model", "parse_device"]
