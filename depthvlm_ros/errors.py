"""Error types that mean "the caller gave us something wrong".

Tools turn these into a one-line message and exit code 2; the ROS node turns them into a
throttled log line, a diagnostics entry or a service ``message``. Anything else is a bug.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad data from outside: an image, intrinsics, a question, a pixel list, a file."""


class CheckpointError(InputError):
    """A model folder that is missing files, has wrong/missing keys or is not loadable."""
