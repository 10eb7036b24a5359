"""One error root for everything loratools reports to a user.

The CLI prints a :class:`LoraToolsError` as ``loratools: error: <file>: <message>`` with exit code 2. Any other
exception is a bug: one line ``loratools: internal error: …`` with exit code 3 (the traceback with ``--debug``).
docs/safety.md lists what is refused and the exit codes.
"""

from __future__ import annotations


def one_line(text: str) -> str:
    """``text`` with its control characters escaped: a file name holding a newline cannot print a second line (or
    forge one) in a message."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class LoraToolsError(Exception):
    """A problem with the user's input that loratools can explain in one line."""

    exit_code = 2

    def __init__(self, message: str, path: object | None = None):
        super().__init__(message)
        self.message = message
        self.path = None if path is None else str(path)

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class HeaderError(LoraToolsError):
    """A safetensors file whose header or layout is invalid."""


class FormatError(LoraToolsError):
    """A file that is readable but is not a LoRA in a format we understand."""


class UnsafeFileError(LoraToolsError):
    """A pickled file that would need unpickling to read."""


class UnknownFamily(LoraToolsError):
    """A family id that does not exist."""


class ShapeMismatch(LoraToolsError):
    """Tensors whose shapes do not fit together."""


class UsageError(LoraToolsError):
    """Options or arguments that do not make sense together."""
