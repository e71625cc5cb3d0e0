"""Errors raised for bad configuration or inputs, with the key or file to fix in the message."""

__all__ = ["ConfigError", "brief"]


class ConfigError(ValueError):
    """A configuration value, file or checkpoint that fgd_d2 cannot use; the message names the key to fix."""


def brief(error: BaseException, limit: int = 300) -> str:
    """``"Type: message"`` on one line, shortened to ``limit`` characters: an underlying cause inside a message."""
    message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    text = f"{type(error).__name__}: {message}"
    return text if len(text) <= limit else text[: limit - 3] + "..."
