"""ConfigError on its own, so that any module can raise it without importing config.py (which
imports the model, quant and objectives tables for its allowed names)."""


class ConfigError(ValueError):
  """A config value is not allowed. The message names the field path, the value and what is allowed."""
