"""Entry point: ``python -m skyrl_mtp.train key=value ...`` (Hydra; configs in the repo's configs/)."""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from skyrl_mtp.config.schema import Config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
ConfigStore.instance().store(name="base_config", node=Config)


def to_config(cfg: DictConfig) -> Config:
    return OmegaConf.to_object(cfg)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    import sys

    from skyrl_mtp.config.schema import ConfigError
    from skyrl_mtp.trainer.driver import RLTrainer

    try:
        trainer = RLTrainer(to_config(cfg))
    except ConfigError as err:  # the list of problems, each with its fix: no traceback needed
        print(err, file=sys.stderr)
        sys.exit(2)
    try:
        trainer.run()
    finally:
        trainer.shutdown()


if __name__ == "__main__":
    main()
