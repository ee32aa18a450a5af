"""`convit-ssl train`: compose a recipe, validate it, run VISSL's training engine."""
from __future__ import annotations

import argparse

EPILOG = """examples:
  convit-ssl train config=dino model=convit_tiny data=digits config.OPTIMIZER.num_epochs=10
  convit-ssl train config=simclr model=convit_small data=imagenet1k
  convit-ssl train config=dino model=convit_small trunk.local_up_to_layer=0   # the DeiT twin

recipes: dino, moco, simclr, swav, barlow_twins (configs/config/convit_ssl/pretrain);
models: any preset (configs/config/convit_ssl/model); data: a name registered with prepare-data.
Rerunning the same command resumes from the last complete checkpoint of its run folder."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("overrides", nargs="+", metavar="KEY=VALUE",
                        help="config=NAME, model=PRESET, data=NAME, trunk.FIELD=VALUE, run_dir=PATH, or any "
                             "Hydra override of the VISSL config (config.OPTIMIZER.num_epochs=10)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args: argparse.Namespace) -> int:
    from convit_ssl import engine

    config = engine.compose(args.overrides)
    if args.print_config:
        import json

        import yaml

        print(yaml.safe_dump(json.loads(json.dumps(config, default=str)), sort_keys=False))
        return 0
    print(f"run folder: {config.CHECKPOINT.DIR}")
    run_dir = engine.train(config)
    print(f"done: checkpoints, metrics.json and TensorBoard logs (tb_logs/) in {run_dir}")
    return 0
