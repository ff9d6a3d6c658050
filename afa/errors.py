"""The errors that mean bad input: a command-line tool names them in one line and exits with 2.

Each class lives beside the code that raises it and is re-exported here, so that a tool writes
``except USER_ERRORS`` instead of its own list:

    ConfigError      afa.config          a config file, key or value that cannot be used
    DataError        afa.data            a dataset, name list, image or mask that cannot be used
    WeightsError     afa.models          pretrained weights that do not fit the encoder
    CheckpointError  afa.safe_load       a checkpoint that is damaged, or does not fit the model
    UnsafeFileError  afa.safe_load       a checkpoint that holds code (a CheckpointError)
    WorkDirBusy      afa.engine.run_lock a work dir another training run holds
    UsageError       here                a request the input contradicts (an unknown class
                                         name, an --out-dir of other settings, ...)

and ``FileNotFoundError`` for a file or folder that is not there. Every message names what is
wrong and, where there is one, what to do.

Built-in errors such as ``ValueError``, ``KeyError`` or ``RuntimeError`` are left out on
purpose: raised anywhere else they are bugs, and a tool that turned them into a one-line message
would hide the traceback that finds them.
"""

from __future__ import annotations

from afa.config import ConfigError
from afa.data.voc import DataError
from afa.engine.run_lock import WorkDirBusy
from afa.models.weights import WeightsError
from afa.safe_load import CheckpointError, UnsafeFileError

__all__ = [
    "USER_ERRORS",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "UnsafeFileError",
    "UsageError",
    "WeightsError",
    "WorkDirBusy",
]


class UsageError(ValueError):
    """A request that the input contradicts, found once the command line is parsed: an unknown
    class name, an output directory that holds another run's outputs, a checkpoint rewritten while
    it was read, a tool started in a way it does not run. The message says what to change."""


USER_ERRORS = (ConfigError, DataError, WeightsError, CheckpointError, WorkDirBusy, UsageError,
               FileNotFoundError)
