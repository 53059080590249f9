"""notsure: an inference service for image classifiers that knows when not to answer."""

from service.version import service_version

__version__ = service_version()  # one source: pyproject.toml, through the installed metadata
