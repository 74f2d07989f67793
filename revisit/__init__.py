"""revisit: a service that learns from every Sentinel-2 revisit."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("revisit")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
