"""Submit ConViT SSL pretraining to SLURM as one multi-node job; see ``convit_ssl.launch`` and ``--help``.

    python launchers/slurm.py --nodes 4 --gpus-per-node 8 --partition P config=dino model=convit_small data=imagenet
"""
import sys

from convit_ssl.launch import main

if __name__ == "__main__":
    sys.exit(main())
