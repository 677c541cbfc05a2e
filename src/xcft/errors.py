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


class ModelFolderError(XcftError):
    """A model folder that cannot be used: missing, truncated or corrupt files, a config of the wrong shape."""


class OutputFolderError(XcftError):
    """An output folder xcft must not write into (the user's files, an input folder, another run's folder)."""


class SaveError(XcftError):
    """Writing an output failed (disk full, permissions, an I/O error); what remains intact is named."""
