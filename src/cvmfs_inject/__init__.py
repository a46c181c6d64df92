"""cvmfs-inject: put a CernVM-FS shrinkwrap tree into container images as a /cvmfs layer."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cvmfs-inject")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
