"""Error types by kind, the exit code each gives, and how untrusted text is quoted.

Two kinds of expected failure, both :class:`DepthVLMError`:

- :class:`InputError`, exit code 2: the caller gave us something wrong (an image, intrinsics, a question,
  an option, a file of data).
- :class:`SetupError`, exit code 3: this machine or a model folder cannot do the job (a runtime that is not
  installed, a device that is missing, a model folder that is incomplete or whose keys are wrong, an engine
  built elsewhere). Fixing it means installing or rebuilding something, not changing the input.

Tools turn both into a one-line message and their exit code; the ROS node turns them into a throttled log
line, a diagnostics entry or a service ``message``. Anything else is a bug (exit code 1 with a traceback).

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


class DepthVLMError(Exception):
    """An expected failure that a tool reports in one line and the node survives.

    ``kind``: a fixed code for what is wrong (logs are throttled by it); empty when the caller has none.
    ``exit_code``: what a command-line tool exits with.
    """

    exit_code = 1

    def __init__(self, message: str, kind: str = "") -> None:
        super().__init__(message)
        self.kind = kind


class InputError(DepthVLMError, ValueError):
    """Bad data from outside: an image, intrinsics, a question, a pixel list, an option, a file (exit code 2)."""

    exit_code = 2


class SetupError(DepthVLMError, RuntimeError):
    """What this machine or a model folder cannot do: a runtime, a device, a model or engine file (exit code 3)."""

    exit_code = 3


class CheckpointError(SetupError):
    """A model folder that is missing files, has wrong/missing keys or is not loadable."""

