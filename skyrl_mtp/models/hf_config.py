"""Reading an HF ``config.json``: the pieces every model family's config class shares
(:mod:`skyrl_mtp.models.mimo`, :mod:`skyrl_mtp.models.qwen3_5`, :mod:`skyrl_mtp.models.families`).
A leaf: it imports no family."""

from __future__ import annotations

import json
from pathlib import Path


def read_config_json(path: str | Path) -> dict:
    """The parsed ``config.json`` of the HF checkpoint directory `path`."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: expected an HF checkpoint directory")
    return json.loads(cfg_file.read_text())


def first_token_id(value, default=None):
    """A special token id that config.json may give as a list (e.g. several ``eos_token_id``): its
    first entry; `default` where there is none."""
    if isinstance(value, list):
        return value[0] if value else default
    return default if value is None else value
