"""Typed exceptions: every error a user can act on derives from :class:`FTWTError`.

The command line turns any ``FTWTError`` into one line on stderr and exit status 2.
"""


class FTWTError(Exception):
    """Base class of the errors ``ftwt`` raises for bad input."""


class ConfigError(FTWTError, ValueError):
    """An option or recipe value is out of range or unknown."""


class ModelNotFoundError(FTWTError, ValueError):
    """No model of that name in the registry or in torchvision."""


class UnsupportedLayerError(FTWTError, ValueError):
    """Model surgery met a layer pattern it cannot gate; the message names the layer."""


class DataError(FTWTError, ValueError):
    """Data is missing, empty or unreadable."""


class CheckpointError(FTWTError, ValueError):
    """A checkpoint is missing, corrupt, unsafe or does not fit the model."""


class DeviceError(FTWTError, RuntimeError):
    """The requested device is not available on this machine."""


class OutputError(FTWTError, OSError):
    """The output folder cannot be written (unwritable, vanished, full) or another run is using it."""


class NonFiniteLossError(FTWTError, FloatingPointError):
    """Training diverged: the loss (or the weights) became inf or NaN."""
