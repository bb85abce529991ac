"""Exceptions that the command line turns into one clear line (no traceback unless --debug)."""

from __future__ import annotations


class UpctlError(Exception):
    """Base for every expected, user-facing error: bad input, missing files, wrong sizes.

    The message must name the file, key or value at fault and say what was expected.
    """


class ConfigError(UpctlError):
    """A recipe, task spec or option is invalid."""


class CheckpointError(UpctlError):
    """A checkpoint is missing, corrupt, unsafe or does not fit the model."""


class DataError(UpctlError):
    """A dataset, manifest or annotation file is missing or malformed."""


class StorageError(UpctlError):
    """A file could not be written (full disk, permissions, I/O error); the previous file is intact."""


class MediaError(DataError):
    """An image or video cannot be read. Loaders catch it, count it and skip the sample.

    `kind` is one of: "missing", "empty", "unreadable", "bad_format"; `path` is the file.
    """

    def __init__(self, path: object, kind: str, detail: str = "") -> None:
        self.path = str(path)
        self.kind = kind
        self.detail = detail
        msg = f"{self.path}: {kind} media"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)
