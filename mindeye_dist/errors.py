"""Errors every layer raises: a leaf module (imports nothing of ours), so no import cycles.

Each message names the key or file that is wrong and says how to fix it.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid. The message names the key."""
