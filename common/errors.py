"""The project's exception types for expected failures.

Every CLI catches :class:`ToolchainError`, prints its message on one line and exits
non-zero without a traceback; anything else is a bug and keeps its traceback.
:class:`EngineError` is what a runner raises when its engine rejects a batch: the
evaluation loop records it against that batch's samples and goes on.
"""


class ToolchainError(Exception):
    """An expected failure with an actionable message (what was asked, what exists)."""


class EngineError(ToolchainError):
    """An inference engine (ONNX Runtime, PyTorch, ais_bench) failed on one batch."""
