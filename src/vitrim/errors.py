"""Errors vitrim raises for bad input. Each message names the problem and the fix."""


class VitrimError(Exception):
    """Base class: the CLI prints these as one line and exits with code 2."""


class ConfigError(VitrimError, ValueError):
    """A model configuration is invalid."""


class ModelFileError(VitrimError):
    """A model directory or weights file is missing, corrupt or does not match its config."""


class DataError(VitrimError):
    """A dataset is missing, truncated or does not fit the model."""


class UnknownModelError(VitrimError, KeyError):
    """A model name is neither a registered preset nor a model directory."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class OutputError(VitrimError):
    """An output path cannot be written (a file where a directory belongs, read-only, or busy)."""
