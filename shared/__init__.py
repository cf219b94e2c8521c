"""imgq's common package: settings, the Celery app, the model registry, label sets,
message and result schemas, and image decoding. Nothing here imports TensorFlow."""

__version__ = "0.1.0"
