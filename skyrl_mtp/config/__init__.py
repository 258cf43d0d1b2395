"""Structured configs (dataclasses backing the Hydra tree in configs/) and their validation."""

from skyrl_mtp.config.schema import Config, ConfigError, validate_config  # noqa: F401
