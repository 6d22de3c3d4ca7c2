"""TEST DOUBLE of ``ais_bench.infer.interface`` (Ascend ait benchmark), backed by ONNX Runtime.

It exists only so the tests can check our side of the ais_bench contract on a machine
without an NPU. The "om" it loads is an ONNX model's bytes written under a .om name; the
compiled dynamic-shape plan, which a real .om carries inside, is read from the sidecar JSON
beside it (``convert.atc``'s shape plan: ``mode``, ``inputs`` with ``dims``, ``gears``).
Like the real session it:
    * takes ``InferSession(device_id, model_path)`` and ``infer(feeds: list, mode, custom_sizes)``;
    * in ``dymshape`` mode (range models) rejects shapes outside the compiled ranges and a
      ``custom_sizes`` smaller than the output needs;
    * in ``dymdims`` mode (gear models) accepts only the compiled static dims and gears;
    * frees its resources with ``free_resource()``.
Every call is appended to ``InferSession.calls`` for the tests to inspect. For tests that run
it in other processes, two environment variables:
    * ``FAKE_AIS_BENCH_LOG``: a file; each session start appends a JSON line
      ``{"pid", "device_id", "visible"}`` (``visible``: ``ASCEND_RT_VISIBLE_DEVICES``);
    * ``FAKE_AIS_BENCH_DIE_ONCE``: a file that does not exist yet; the first ``infer`` call
      of any process creates it and kills its process (``os._exit``), as a crashed NPU
      driver would, so exactly one worker dies once.
    * ``FAKE_AIS_BENCH_DIE_ALWAYS``: a file; while it exists, every ``infer`` call kills its
      process, as an NPU whose driver crashes on every run would.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort


class InferSession:
    calls: list[dict] = []

    def __init__(self, device_id: int, model_path: str):
        path = Path(model_path)
        self.plan = json.loads(path.with_suffix(".json").read_text())
        self.session = ort.InferenceSession(path.read_bytes(), providers=["CPUExecutionProvider"])
        self.device_id = device_id
        self.freed = False
        InferSession.calls.append({"call": "init", "device_id": device_id, "model": model_path})
        if os.environ.get("FAKE_AIS_BENCH_LOG"):
            with open(os.environ["FAKE_AIS_BENCH_LOG"], "a") as log:
                log.write(json.dumps({"pid": os.getpid(), "device_id": device_id,
                                      "visible": os.environ.get("ASCEND_RT_VISIBLE_DEVICES")})
                          + "\n")

    def infer(self, feeds, mode="static", custom_sizes=100000):
        always = os.environ.get("FAKE_AIS_BENCH_DIE_ALWAYS")
        if always and os.path.exists(always):
            os._exit(18)
        marker = os.environ.get("FAKE_AIS_BENCH_DIE_ONCE")
        if marker:
            try:
                with open(marker, "x"):
                    pass
            except FileExistsError:
                pass
            else:
                os._exit(17)
        (array,) = feeds
        (plan,) = self.plan["inputs"]
        InferSession.calls.append({"call": "infer", "mode": mode, "shape": array.shape,
                                   "custom_sizes": custom_sizes})
        if len(array.shape) != len(plan["dims"]):
            raise RuntimeError(f"rank of {array.shape} is not the compiled rank")
        if self.plan["mode"] == "range":
            if mode != "dymshape":
                raise RuntimeError(f"range model run with mode {mode}")
            for got, dim in zip(array.shape, plan["dims"]):
                low, high = dim if isinstance(dim, list) else (dim, dim)
                if not low <= got <= high:
                    raise RuntimeError(f"shape {array.shape} outside the compiled range")
        else:
            if mode != "dymdims":
                raise RuntimeError(f"gear model run with mode {mode}")
            gear = tuple(got for got, dim in zip(array.shape, plan["dims"]) if dim == -1)
            static = [(got, dim) for got, dim in zip(array.shape, plan["dims"]) if dim != -1]
            if any(got != dim for got, dim in static) or list(gear) not in self.plan["gears"]:
                raise RuntimeError(f"shape {array.shape} is not a compiled gear")
        (output,) = self.session.run(None, {plan["name"]: array})
        if mode == "dymshape" and output.nbytes > custom_sizes:
            raise RuntimeError(f"custom_sizes {custom_sizes} < output {output.nbytes} bytes")
        return [np.ascontiguousarray(output)]

    def free_resource(self):
        self.freed = True
        InferSession.calls.append({"call": "free_resource"})
