"""The Open Inference Protocol's model operations, shared by its two transports: REST
(:mod:`serve.app`) and gRPC (:mod:`serve.grpc_server`).

Each operation takes the already-parsed request and raises :class:`serve.service.ServiceError`
with an HTTP status; the transports turn results and errors into their own messages, so a
model answers the same over both.
"""

from __future__ import annotations

from infer.device import parse_device
from serve import kserve
from serve.service import Service, ServiceError

#: Where the engine runs, as Triton's ``instance_group`` kind names it.
DEVICE_KINDS = {"cpu": "KIND_CPU", "cuda": "KIND_GPU", "npu": "KIND_MODEL"}


class V2Model:
    """The served model as the v2 protocol sees it: its name, tensors and operations.

    Args:
        service: the service (loaded or not).
    """

    def __init__(self, service: Service) -> None:
        self.service = service
        self.name = service.config.name
        self.classifier = service.classifier is not None
        #: Output name -> datatype.
        self.outputs = kserve.CLASSIFIER_OUTPUTS if self.classifier else kserve.OUTPUTS
        #: A classifier's answers hold its k most probable labels (at most all of them).
        self.top_k = (min(service.config.top_k, service.spec.num_classes) if self.classifier
                      else 0)

    def check_model(self, model: str, version: str | None = None) -> None:
        """Raises: ServiceError 404 for another model's name or a version other than 1."""
        if model != self.name:
            raise ServiceError(404, f"unknown model {model!r}; this server serves "
                                    f"{self.name!r}")
        if version not in (None, "", "1"):
            raise ServiceError(404, f"model {self.name!r} has version '1' only, not "
                                    f"{version!r}")

    def metadata(self) -> dict:
        """The model metadata document (``GET /v2/models/{name}``)."""
        return kserve.model_metadata(self.name, self.service.backend.platform, self.outputs,
                                     self.top_k if self.classifier else None)

    def config(self) -> dict:
        """Triton's model configuration (``GET /v2/models/{name}/config``)."""
        config = self.service.config
        device = (parse_device(config.device).kind if config.device
                  else self.service.backend.devices[0])
        return kserve.model_config(
            self.name, self.service.backend.platform, self.outputs,
            self.top_k if self.classifier else None, config.max_request_images,
            config.max_batch_size, config.max_wait_ms, config.timeout_ms, config.max_queue,
            DEVICE_KINDS.get(device, "KIND_CPU"))

    def statistics(self) -> dict:
        """This model's entry of Triton's statistics (``GET /v2/models/{name}/stats``)."""
        return kserve.model_statistics(self.name, self.service.metrics.statistics())

    async def infer(self, images: list[bytes], arrival: float) -> dict[str, list]:
        """Run the model on a request's images.

        Returns:
            Output name -> one value per image (a classifier: one list of ``top_k`` per image).

        Raises:
            ServiceError: as :meth:`serve.service.Service.recognise`.
        """
        service = self.service
        if self.classifier:
            tops = [r.top(self.top_k) for r in await service.classify(images, arrival)]
            return {kserve.LABELS: [[label for label, _ in top] for top in tops],
                    kserve.PROBABILITIES: [[p for _, p in top] for top in tops]}
        decoded = await service.recognise(images, arrival)
        return {kserve.TEXTS: [d.text for d in decoded],
                kserve.CONFIDENCES: [d.confidence for d in decoded]}


__all__ = ["V2Model"]
