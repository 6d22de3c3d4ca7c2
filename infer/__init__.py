"""Inference backends: one small runner per engine, by name.

Engines are imported only when a runner loads, so this package imports on machines without
ais_bench, CUDA or even torch.
"""

from infer.ais_bench_runner import AisBenchRunner
from infer.base import InputSpec, Runner
from infer.onnxruntime_runner import OnnxRuntimeRunner
from infer.torch_runner import TorchRunner

BACKENDS: dict[str, type[Runner]] = {
    "onnxruntime": OnnxRuntimeRunner,
    "ais_bench": AisBenchRunner,
    "torch": TorchRunner,
}

__all__ = ["BACKENDS", "AisBenchRunner", "InputSpec", "OnnxRuntimeRunner", "Runner", "TorchRunner"]
