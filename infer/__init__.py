"""Inference backends: one small runner per engine, opened by a model file's suffix through the
backend table (``models.backends``).

Engines are imported only when a runner loads, so this package imports on machines without
ais_bench, CUDA or even torch.
"""

from infer.ais_bench_runner import AisBenchRunner
from infer.base import InputSpec, OpenOptions, Runner
from infer.onnxruntime_runner import OnnxRuntimeRunner
from infer.open import describe, open_model, parse_device, runner_class
from infer.torch_runner import TorchRunner

__all__ = ["AisBenchRunner", "InputSpec", "OnnxRuntimeRunner", "OpenOptions", "Runner",
           "TorchRunner", "describe", "open_model", "parse_device", "runner_class"]
