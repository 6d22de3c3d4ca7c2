"""The one exception type for expected failures of the toolchain.

Every CLI catches :class:`ToolchainError`, prints its message on one line and exits
non-zero without a traceback; anything else is a bug and keeps its traceback.
"""


class ToolchainError(Exception):
    """An expected failure with an actionable message (what was asked, what exists)."""
