"""Where the shipped configs live and which ones each group offers. Reads files only: no VISSL, Hydra or torch.

``PACKAGE_CONFIGS`` is the root Hydra searches (``configs/config/convit_ssl/...``, package data); a shorthand
group (``model=``, ``data=``) is a folder of YAML files under it, one option per file.
"""
from __future__ import annotations

from pathlib import Path
from typing import List

PACKAGE_CONFIGS = Path(__file__).resolve().parent / "configs"
RECIPE_GROUP = "convit_ssl/pretrain"  # under PACKAGE_CONFIGS / "config": the pretraining recipes, config=NAME
SHORTHAND_GROUPS = {"model": "config/convit_ssl/model", "data": "config/convit_ssl/data"}
DATA_CONFIG_DIR = PACKAGE_CONFIGS / SHORTHAND_GROUPS["data"]


def group_options(group: str) -> List[str]:
    """The options of a config group (a folder under ``PACKAGE_CONFIGS``): its YAML files' names, sorted."""
    return sorted(p.stem for p in (PACKAGE_CONFIGS / group).glob("*.yaml"))


def data_config_names() -> List[str]:
    """The shipped data configs (crop sizes, statistics, patch size of a kind of dataset): ``data=NAME``."""
    return group_options(SHORTHAND_GROUPS["data"])
