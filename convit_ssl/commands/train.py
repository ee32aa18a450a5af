"""`convit-ssl train`: compose a recipe, validate it, run VISSL's training engine."""
from __future__ import annotations

import argparse

EPILOG = """examples:
  convit-ssl train config=dino model=convit_tiny data=digits config.OPTIMIZER.num_epochs=10
  convit-ssl train config=simclr model=convit_small data=imagenet1k
  convit-ssl train config=dino model=convit_small trunk.local_up_to_layer=0   # the DeiT twin

recipes: dino, moco, simclr, swav, barlow_twins (configs/config/convit_ssl/pretrain);
models: any preset (configs/config/convit_ssl/model); data: a name registered with prepare-data.
Rerunning the same command resumes from the last complete checkpoint of its run folder. A run folder
is used by one run at a time, and its checkpoints keep the config they were trained with: a different
config there is refused unless you add --continue-with-changes (recorded in train_config_history.jsonl)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("overrides", nargs="+", metavar="KEY=VALUE",
                        help="config=NAME, model=PRESET, data=NAME, trunk.FIELD=VALUE, run_dir=PATH, or any "
                             "Hydra override of the VISSL config (config.OPTIMIZER.num_epochs=10)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config and exit (writes nothing, creates no run folder)")
    parser.add_argument("--continue-with-changes", action="store_true",
                        help="continue the checkpoints of run_dir although the config differs from the one they "
                             "were trained with (same as continue_with_changes=true); the change is recorded")


def run(args: argparse.Namespace) -> int:
    from convit_ssl import engine, run_folder

    words = args.overrides + (["continue_with_changes=true"] if args.continue_with_changes else [])
    config = engine.compose(words)
    if args.print_config:
        import json

        import yaml

        print(yaml.safe_dump(json.loads(json.dumps(config, default=str)), sort_keys=False))
        return 0
    print(f"run folder: {config.CHECKPOINT.DIR}")
    run_dir = engine.train(config)
    written = run_folder.outputs(run_dir)
    listed = " and ".join([", ".join(written[:-1]), written[-1]] if len(written) > 1 else written) or "nothing written"
    print(f"done: {listed} in {run_dir}")
    return 0
