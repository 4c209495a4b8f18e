"""User-facing errors: the CLI prints these as one paragraph and exits non-zero, never a traceback."""

from __future__ import annotations


class CrossLMError(Exception):
    """A mistake the user can fix (bad config, missing package, bad data). The message says how."""


class ConfigError(CrossLMError):
    """A config file or override names an unknown key or holds a value of the wrong type."""


class CatalogueError(CrossLMError):
    """An unknown model/dataset name, or a catalogue package that is not installed."""


class DataError(CrossLMError):
    """A dataset that cannot be used as configured (missing columns, impossible partition, ...)."""


class ProtocolError(CrossLMError):
    """A received message failed validation. The receiver logs the reason and drops the message."""
