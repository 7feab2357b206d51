"""Every failure a user can cause, as one family: `DocoError`.

Each message names the file, key or value and what to do; the `doco` command prints it as one
`doco: error: …` line and exits with `exit_status` (papermill runs end the same way, through the CLI).
The base classes beside `DocoError` keep the Python meaning of each failure (a bad value is a ValueError,
a busy run a RuntimeError), so callers that catch those still do.
"""

from __future__ import annotations


class DocoError(Exception):
    """A failure the user can fix; the message says how."""

    exit_status = 2


class ParamsError(DocoError, ValueError):
    """A params file or value is invalid; the message says which key, which value, what was expected."""


class PromptFileError(DocoError, ValueError):
    """A prompt file is missing, empty or malformed; the message names the file and line."""


class SlotsError(DocoError, ValueError):
    """An RGD slots file is malformed; the message names the file and the key."""


class CorruptFileError(DocoError, ValueError):
    """A file the run reads is damaged or not of the expected kind; the message names it and what to do."""


class ModelLoadError(DocoError, RuntimeError):
    """A model could not be loaded; the message says what was tried and what to do."""


class RunLocked(DocoError, RuntimeError):
    """Another process holds a lock (of a run folder, a manifest, a cache shard); the message names the lock file."""


class TrainingDoesNotFit(ParamsError):
    """The adversarial phase runs out of GPU memory; the message names the params keys that reduce it."""


class TrainingDiverged(DocoError, RuntimeError):
    """A loss or gradient became non-finite; the message names the step and the keys to lower."""

    exit_status = 3


class ToyDefaultsWarning(UserWarning):
    """A real model runs a method with settings left at the toy world's defaults, which differ from the method's
    recipe; the message names each key, its toy default and the recipe's value (`doco_lib.config`,
    `check_real_model_defaults`). A warning, not a failure: the run is the method, with other settings."""
