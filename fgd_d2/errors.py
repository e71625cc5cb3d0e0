"""Errors raised for bad configuration or inputs, with the key or file to fix in the message."""

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A configuration value, file or checkpoint that fgd_d2 cannot use; the message names the key to fix."""
