"""Exceptions raised by adaptc. Every message says what was wrong and what to do."""


class AdaptcError(Exception):
    """Base class of every error adaptc raises on purpose."""


class CaptureError(AdaptcError):
    """The model could not be captured as a graph."""


class ConfigError(AdaptcError, ValueError):
    """An option of a method (rank, targets, ...) is invalid."""


class TargetError(ConfigError):
    """The target selector matched no site of the model."""


class InputError(AdaptcError, ValueError):
    """The example inputs or call inputs are unusable."""


class MergeError(AdaptcError):
    """Adapters could not be folded into the weights (a tied weight, NaN/inf); the model is unchanged."""


class ExportError(AdaptcError):
    """Export to ONNX failed (an op the exporter cannot lower, an opset ORT cannot run, a parity failure)."""


class CheckpointError(AdaptcError):
    """An adapter checkpoint cannot be saved or loaded (missing/extra key, shape, format); nothing was changed."""


class TrainingError(AdaptcError):
    """Training stopped: a NaN/inf loss or gradient, or batches the model cannot take; no bad weights were saved."""
