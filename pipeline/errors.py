"""Errors whose message is fit to show a user as is: it names the file and the problem."""


class DreamfocusError(Exception):
    """Base class; the CLI prints the message in one line and exits non-zero."""


class BadInputError(DreamfocusError):
    """An input (photo, mask, depth, config) that cannot be used. The job records it and goes on."""


class WeightsUnavailableError(DreamfocusError):
    """Model weights that cannot be found or fetched."""


class OutputError(DreamfocusError):
    """An output that cannot be written (missing permission, full disk, ...)."""
