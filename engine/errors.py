"""Errors that carry a message meant for the user.

The CLI prints these as one line (no traceback); anything else is a bug and keeps its traceback.
"""


class SmoothServeError(Exception):
    """Base class: the message is complete and safe to show to a user."""


class ConfigError(SmoothServeError, ValueError):
    """A configuration value is invalid."""


class ModelLoadError(SmoothServeError):
    """A model directory, hub name or checkpoint file cannot be used."""


class CalibrationError(SmoothServeError):
    """Calibration data is missing, empty or unusable."""


class QuantizationError(SmoothServeError):
    """A model cannot be smoothed or quantized as asked."""


class DataError(SmoothServeError):
    """An evaluation or benchmark data file or data set is missing, empty or unusable."""


class BenchmarkError(SmoothServeError):
    """A benchmark cannot run as asked (e.g. the server cannot be reached)."""


class WorkerFailedError(SmoothServeError):
    """A tensor-parallel rank died, failed or hung; the engine has stopped every rank and cannot continue."""
