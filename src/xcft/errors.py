"""User-facing errors.

Library code raises :class:`XcftError` for anything the user can fix (bad data, a
wrong path, an impossible flag combination). The CLI prints the message without a
traceback and exits with status 1; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class XcftError(Exception):
    """An error caused by user input. The message must say what is wrong and how to fix it."""


class DataError(XcftError):
    """A problem with a data file, a sample or an image."""
