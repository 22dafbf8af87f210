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


class StorageError(RuntimeError):
    """The disk (or store) a run writes to is full or read-only; the message names the file, the cause and the
    fix. Files already complete (checkpoints, results) are kept, and the write's own temporary is removed."""


class ModelInputError(ValueError):
    """Input given to a loaded model does not have the shape the model was trained on; the message names both."""


class ModelFileError(RuntimeError):
    """model.pt is missing, unreadable or not one this version writes."""


class PlacementError(RuntimeError):
    """The run cannot be placed on this cluster; the message names what it needs and what there is."""


class ClusterConnectionError(RuntimeError):
    """A cluster was found but this process could not join it."""


class ResourceError(RuntimeError):
    """A run asks for more than the machine it would run on has; the message names both and the fix."""


class RunLockedError(RuntimeError):
    """Another run holds the output directory (hsic_ray.run.lock); the message names it."""


class Interrupted(BaseException):  # like KeyboardInterrupt: no `except Exception` swallows it
    """SIGINT or SIGTERM stopped the run (hsic_ray.interrupt): at a safe point after its checkpoint (`step`
    set), or at once (`step` None, continued from the last checkpoint). The job prints `str()` as its one
    line and exits 128 + `signum`."""

    def __init__(self, signum: int, step: int | None = None, how: str = "rerun the same command to continue"):
        self.signum, self.step = int(signum), step
        where = "" if step is None else f" at step {step}"
        super().__init__(f"interrupted{where}; {how}")


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
    RunLockedError,
    StorageError,
    ModelInputError,
)
