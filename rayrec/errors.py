"""Exceptions rayrec raises on bad input. Each message names what is wrong and where."""

from __future__ import annotations

from pathlib import Path


class RayrecError(Exception):
    """Base class of every error rayrec raises on purpose."""


class ConfigError(RayrecError, ValueError):
    """An invalid configuration: unknown key, wrong type, value out of range. Raised before Ray starts."""


class DataFormatError(RayrecError, ValueError):
    """A malformed input file. The message is ``<path>:<line>: <what>`` (line omitted when it does not apply)."""

    def __init__(self, path: str | Path, line: int | None, message: str) -> None:
        self.path = str(path)
        self.line = line
        self.detail = message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


class DatasetNotFoundError(RayrecError, FileNotFoundError):
    """A dataset's files are missing under the data root and could not be downloaded."""


class SplitError(RayrecError, ValueError):
    """A split that cannot be made as asked (e.g. a user left with no training items)."""


class ArtifactError(RayrecError, FileNotFoundError):
    """A missing or inconsistent artifact (prepared dataset, checkpoint, ranking)."""


class NonFiniteError(RayrecError, FloatingPointError):
    """A non-finite loss or gradient stopped training; the message names the epoch, step and loss terms and the
    last good checkpoint (which is kept)."""
