"""Errors that are the user's to fix: each message names the problem and the fix.

A job prints one of these as one line and exits with code 2 (`hsic_ray.cli.run_job`); anything else is a
bug and keeps its traceback. This module imports neither torch nor Ray, so the command line can name
these errors without paying for either.
"""


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field and what it accepts."""


class DataError(ValueError):
    """The data or its source is wrong; the message names the problem and how to fix it."""


class OutputLocationError(ValueError):
    """An output location that cannot hold a run (a file, unwritable, an unknown or unreachable URI)."""


class OutputExistsError(FileExistsError):
    """The output directory holds something a new run must not write over (a finished run, another kind of
    run, or files that are not a run)."""


class NothingToResumeError(FileNotFoundError):
    """--resume named a directory that holds no run to continue."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or unreadable."""


class ModelFileError(RuntimeError):
    """model.pt is missing, unreadable or not one this version writes."""


class PlacementError(RuntimeError):
    """The run cannot be placed on this cluster; the message names what it needs and what there is."""


class ClusterConnectionError(RuntimeError):
    """A cluster was found but this process could not join it."""


class ResourceError(RuntimeError):
    """A run asks for more than the machine it would run on has; the message names both and the fix."""


# What a job reports as one line rather than a traceback.
USER_ERRORS = (
    ConfigError,
    DataError,
    OutputExistsError,
    OutputLocationError,
    NothingToResumeError,
    CheckpointError,
    PlacementError,
    ClusterConnectionError,
    ResourceError,
)
