"""Errors whose message is fit to show a user as is (it names the file and the problem), and
whose type says what kind of problem it is.

The kind is what the manifest counts and what decides a photo's fate: whether its row is
`failed` or `skipped`, and whether a plain rerun tries it again. It belongs to the type, never
to the message's wording, so messages can change freely.
"""

from __future__ import annotations

import sys
from typing import ClassVar


class DreamfocusError(Exception):
    """Base class; the CLI prints the message in one line and exits non-zero."""

    kind: ClassVar[str] = "error"
    # A photo that meets this error is left alone (a `skipped` row) rather than `failed`.
    leaves_alone: ClassVar[bool] = False
    # Not the photo's fault: a plain rerun tries it again, without --retry-failed.
    retried_by_rerun: ClassVar[bool] = False
    # Decided by the listing, not by the file: each run decides again (an option may change it).
    decided_by_listing: ClassVar[bool] = False


class BadInputError(DreamfocusError):
    """An input (photo, mask, depth, config, option) that cannot be used. The job records it
    and goes on."""

    kind = "bad-input"


class EmptyFileError(BadInputError):
    kind = "empty-file"


class NotAnImageError(BadInputError):
    """A file that is no image at all: nothing to do, so it is left alone."""

    kind = "not-an-image"
    leaves_alone = True


class CorruptImageError(BadInputError):
    kind = "corrupt-image"


class UnsupportedImageError(BadInputError):
    kind = "unsupported-image"


class UnsupportedCameraError(UnsupportedImageError):
    """A camera RAW whose camera (or format variant) LibRaw does not know."""

    kind = "unsupported-camera"


class TooManyPixelsError(BadInputError):
    kind = "too-many-pixels"


class UnsafeNameError(BadInputError):
    """A relative path that could escape its folder or cannot be stored."""

    kind = "unsafe-name"


class BrokenLinkError(BadInputError):
    """A symbolic link that leads to no file: dangling, or a loop of links."""

    kind = "broken-link"


class PairedFileSkipped(DreamfocusError):
    """One of a RAW + JPEG pair (same name, same folder, as cameras write them): only the other
    one is processed, and this one is left alone."""

    kind = "raw-jpeg-pair"
    leaves_alone = True
    decided_by_listing = True


class WeightsUnavailableError(DreamfocusError):
    """Model weights that cannot be found or fetched."""

    kind = "weights-unavailable"


class OutputError(DreamfocusError):
    """An output that cannot be written (missing permission, full disk, ...)."""

    kind = "write-error"
    retried_by_rerun = True


class ReadError(DreamfocusError):
    """An input that could not be read for reasons not its own (storage errors that outlived
    the retries): a plain rerun reads it again."""

    kind = "read-error"
    retried_by_rerun = True


class SourceChangedError(DreamfocusError):
    """An input replaced while the run read it, again and again: a plain rerun tries again."""

    kind = "changed-while-read"
    retried_by_rerun = True


class SourceVanishedError(DreamfocusError):
    """An input deleted after the listing found it: nothing to do, so it is left alone."""

    kind = "deleted-while-read"
    leaves_alone = True


class OutputBusyError(DreamfocusError):
    """Another job holds OUTPUT (its lease is live): two jobs never write one OUTPUT."""

    kind = "output-busy"


class OutOfMemoryError(DreamfocusError):
    """A photo that ran out of memory (host or GPU) even alone."""

    kind = "out-of-memory"
    retried_by_rerun = True


KINDS: tuple[type[DreamfocusError], ...] = (
    BadInputError,
    EmptyFileError,
    NotAnImageError,
    CorruptImageError,
    UnsupportedImageError,
    UnsupportedCameraError,
    TooManyPixelsError,
    UnsafeNameError,
    BrokenLinkError,
    PairedFileSkipped,
    WeightsUnavailableError,
    OutputError,
    ReadError,
    SourceChangedError,
    SourceVanishedError,
    OutputBusyError,
    OutOfMemoryError,
)
RETRIED_KINDS = frozenset(cls.kind for cls in KINDS if cls.retried_by_rerun)
LISTING_KINDS = frozenset(cls.kind for cls in KINDS if cls.decided_by_listing)


def is_out_of_memory(exc: BaseException) -> bool:
    """Host memory, or a GPU's: torch raises its own type; onnxruntime and older torch builds
    raise a RuntimeError that says so (their wording, not ours)."""
    if isinstance(exc, (MemoryError, OutOfMemoryError)):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def classify(exc: BaseException) -> type[DreamfocusError] | None:
    """The kind of a foreign exception, where one applies (None: a plain failure)."""
    if isinstance(exc, DreamfocusError):
        return type(exc)
    if is_out_of_memory(exc):
        return OutOfMemoryError
    return None


def error_kind(exc: BaseException) -> str:
    """A short, countable name for what went wrong."""
    cls = classify(exc)
    return cls.kind if cls is not None else type(exc).__name__
