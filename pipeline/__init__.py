"""In-memory pipelines above the runners: images in, text out (``Recognizer``)."""

from pipeline.recognizer import BatchResult, Failure, Recognition, Recognizer

__all__ = ["BatchResult", "Failure", "Recognition", "Recognizer"]
