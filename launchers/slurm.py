"""Submit ConViT SSL pretraining (or an evaluation) to SLURM as one multi-node job; see ``convit_ssl.launch``.

    python launchers/slurm.py --nodes 4 --gpus-per-node 8 --partition P config=dino model=convit_small data=imagenet
    python launchers/slurm.py --nodes 2 --gpus-per-node 8 --partition P linear-probe --checkpoint RUN --recipe imagenet1k
"""
import sys

from convit_ssl.launch import main

if __name__ == "__main__":
    sys.exit(main())
