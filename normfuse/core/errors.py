"""Errors normfuse raises for problems a user can fix.

Every message states the problem and, where there is one, ends with ``Note: <how to fix it>``.
The CLI prints them as one line ``error: <message>`` and exits with code 2 (bad input) or
1 (parity failure).
"""

from __future__ import annotations

import logging

__all__ = [
    "InputError",
    "NormfuseError",
    "OutputExistsError",
    "ParityError",
    "ProviderError",
    "StrictError",
]

logger = logging.getLogger(__name__)


class NormfuseError(Exception):
    """Base class of the errors normfuse raises on purpose.

    Attributes:
        exit_code: The CLI exit code for this error.
        note: How to fix it, or ``None``.
    """

    exit_code = 2

    def __init__(self, message: str, note: str | None = None) -> None:
        self.message = message
        self.note = note
        super().__init__(f"{message}. Note: {note}" if note else message)


class InputError(NormfuseError):
    """The input model or an argument cannot be used."""


class OutputExistsError(NormfuseError):
    """The output exists, or is the input, and the user did not allow replacing it."""


class ProviderError(NormfuseError):
    """The requested onnxruntime execution provider cannot run here."""


class ParityError(NormfuseError):
    """The rewritten model does not match the original within tolerance.

    Attributes:
        report: The :class:`normfuse.core.report.Report` with the per-output results.
    """

    exit_code = 1

    def __init__(self, message: str, report: object = None, note: str | None = None) -> None:
        super().__init__(message, note)
        self.report = report


class StrictError(NormfuseError):
    """``strict=True`` and some candidates were skipped."""

    exit_code = 1

    def __init__(self, message: str, report: object, note: str | None = None) -> None:
        super().__init__(message, note)
        self.report = report
