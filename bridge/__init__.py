"""wavespeed-bridge: WaveSpeedAI prediction ids in from Kafka, completion events out."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("wavespeed-bridge")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
