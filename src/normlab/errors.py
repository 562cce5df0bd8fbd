"""Errors a user can cause. The CLI prints ``str(err)`` as one line and exits with status 2."""


class NormlabError(Exception):
    """Base class for every user-facing error (bad config, bad data, bad checkpoint)."""


class ConfigError(NormlabError, ValueError):
    """An invalid configuration value; the message names the field."""


class DataError(NormlabError):
    """A missing, empty or unreadable corpus, tokenizer or token shard."""


class CheckpointError(NormlabError):
    """A missing, corrupt or incompatible checkpoint or run directory."""
