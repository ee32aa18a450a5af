"""The tiny `convit-ssl train` run that engine tests share: seconds on a CPU core."""
import subprocess
import sys
import time

# A small, fast SimCLR run of the demo recipe: 2 blocks of width 32, batch 64 (22 iterations per epoch).
TINY = ["config=digits_simclr", "data=digits", "trunk.embed_dim=32", "trunk.depth=2", "trunk.local_up_to_layer=1",
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=64", "config.DATA.NUM_DATALOADER_WORKERS=0"]


def train_command(run_dir, *extra):
    return [sys.executable, "-m", "convit_ssl", "train", *TINY, f"run_dir={run_dir}", *extra]


def run(command, env, timeout=600):
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def wait_for(predicate, timeout, process):
    """True once ``predicate()`` holds (polled every 10 ms); False after ``timeout`` s, or when ``process`` ended
    without it holding."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if process.poll() is not None:
            return predicate()
        time.sleep(0.01)
    return False
