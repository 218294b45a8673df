"""One exception hierarchy for the whole toolchain.

Every message says what was received, what is allowed and how to fix it; the CLI prints the message of a
``TdqrtError`` without a traceback and exits with status 2.
"""


class TdqrtError(Exception):
    """Base class of every error tdqrt raises on purpose."""


class ConfigError(TdqrtError, ValueError):
    """A setting is out of range or inconsistent with another setting."""


class DataError(TdqrtError, ValueError):
    """Input data is unusable: empty folder, unreadable file, wrong shape, NaN/Inf."""


class ArtifactError(TdqrtError):
    """A file written by a tdqrt stage is missing, truncated, corrupt, or does not match what reads it."""


class DependencyError(TdqrtError):
    """An optional dependency (TensorRT, a CUDA device) that the requested backend needs is missing."""


class FolderLockedError(TdqrtError):
    """Another running process is writing the output folder this run would write."""
