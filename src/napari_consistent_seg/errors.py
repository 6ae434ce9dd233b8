"""Exceptions a user can cause; each message says what went wrong and what to do."""


class ConsistentSegError(Exception):
    """Base class of every error this package raises on purpose."""


class VolumeReadError(ConsistentSegError):
    """A file or folder could not be read as a CT/MRI volume."""


class ModelLoadError(ConsistentSegError):
    """A model name or checkpoint could not be resolved or loaded."""


class InvalidInputError(ConsistentSegError, ValueError):
    """An argument has the wrong type, shape or value (also a ValueError, for callers that catch that)."""


class ShapeMismatchError(ConsistentSegError):
    """Two arrays that must share a grid do not."""


class Cancelled(ConsistentSegError):
    """Long work was stopped by the caller's cancel request."""
