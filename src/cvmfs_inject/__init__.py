"""cvmfs-inject: put a CernVM-FS shrinkwrap tree into container images as a /cvmfs layer."""

# The single source of the version (pyproject reads it); a literal, because looking it up
# through importlib.metadata costs every command a noticeable start-up delay.
__version__ = "0.1.0"
PROG = "cvmfs-inject"  # the command's name, in messages and --version

__all__ = ["PROG", "__version__"]
