"""A test double: the runner module of a made-up backend, ``fake``, whose model files end in
``.fake`` and are ONNX files under another name (so it runs them with ONNX Runtime). With its
one row in ``models.backends.BACKENDS`` it is what a new backend adds."""

from infer.onnxruntime_runner import OnnxRuntimeRunner


class FakeRunner(OnnxRuntimeRunner):
    """ONNX Runtime under the name ``fake`` (a test double, not a real engine)."""

    name = "fake"
