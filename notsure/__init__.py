"""notsure: an inference service for image classifiers that knows when not to answer."""

__version__ = "0.1.0"
