"""Errors of the data plane. Every message says what is wrong and how to fix it."""

from __future__ import annotations


class DataError(ValueError):
    """Input data or a dataset is missing, malformed or inconsistent."""


class StorageError(DataError):
    """A dataset location cannot be reached or read (endpoint, credentials, permissions)."""


class CorruptShardError(DataError):
    """A shard is truncated, unreadable or disagrees with meta.json. The message names the shard."""
