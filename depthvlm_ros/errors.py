"""Error types that mean "the caller gave us something wrong", and how untrusted text is quoted.

Tools turn these into a one-line message and exit code 2; the ROS node turns them into a
throttled log line, a diagnostics entry or a service ``message``. Anything else is a bug.

Every string that comes from outside (a message's ``encoding`` or ``format``, a camera name in a
request, a question) reaches an error message only through :func:`shown`: cut to a few dozen
characters and repr'd, so no input can make a log line long, multi-line or look like something else.
An error's ``kind`` is a fixed code (``"image.encoding"``) chosen where it is raised; the node
throttles its logs by kind, never by the text an input controls.
"""

from __future__ import annotations

#: Characters of an untrusted string that an error message quotes.
SHOWN_CHARS = 40


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """An untrusted value as an error message quotes it: repr'd, cut to ``limit`` characters (saying how
    long it was when cut)."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


class InputError(ValueError):
    """Bad data from outside: an image, intrinsics, a question, a pixel list, a file.

    ``kind``: a fixed code for what is wrong (logs are throttled by it); empty when the caller has none.
    """

    def __init__(self, message: str, kind: str = "") -> None:
        super().__init__(message)
        self.kind = kind


class CheckpointError(InputError):
    """A model folder that is missing files, has wrong/missing keys or is not loadable."""

