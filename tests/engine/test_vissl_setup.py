"""VISSL is set up where it is used: `import convit_ssl` and prepare-data leave it alone; the dataset catalog VISSL
reads is the one on disk when the run starts, also for a dataset written after the import (digits on an empty data
root); and a data-loader worker (forkserver) has the trunk and the patches without being told."""
import json
import os
import subprocess
import sys

import pytest
from tiny_training import TINY

# The `convit-ssl train` path (compose, then engine.train) with VISSL's launcher replaced by VISSL's own dataset
# builder and one batch from a forkserver loader worker, so that what VISSL reads is checked without training.
SCRIPT = """
import json, sys
import convit_ssl


def vissl_modules():
    return sorted(name for name in sys.modules if name == "vissl" or name.startswith("vissl."))


VISSL_AT_IMPORT = vissl_modules()


def prepare_an_image_folder(folder):
    # prepare-data of a two-class image folder: registering data needs no VISSL
    from PIL import Image
    from convit_ssl import data

    for split in ("train", "val"):
        for label in ("a", "b"):
            (folder / split / label).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(folder / split / label / "0.png")
    data.prepare_dataset("tiny_folder", folder, progress=False)
    return vissl_modules()


def worker_state(worker_id):
    from vissl.data.ssl_dataset import GenericSSLDataset
    from vissl.models.trunks import MODEL_TRUNKS_REGISTRY

    print("worker " + json.dumps({"trunk": "convit_ssl" in MODEL_TRUNKS_REGISTRY,
                                  "seeded_samples": hasattr(GenericSSLDataset.__getitem__, "__wrapped__")}),
          flush=True)


def read_datasets(config, node_id, engine_name, hook_generator):
    import torch
    from vissl.data import build_dataset

    dataset = build_dataset(config, "TRAIN")
    dataset.augmentation_epoch = 0
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=1, worker_init_fn=worker_state,
                                         multiprocessing_context="forkserver")
    next(iter(loader))
    print("run " + json.dumps({"vissl_at_import": VISSL_AT_IMPORT, "vissl_after_prepare_data": PREPARED,
                               "train_images": len(dataset)}), flush=True)


if __name__ == "__main__":
    from pathlib import Path

    PREPARED = prepare_an_image_folder(Path(sys.argv.pop(1)))
    from convit_ssl import engine
    import vissl.utils.distributed_launcher as launcher

    launcher.launch_distributed = read_datasets
    engine.train(engine.compose(sys.argv[1:]))
"""


@pytest.mark.slow
def test_vissl_is_set_up_where_it_is_used_and_reads_the_catalog_on_disk(tmp_path):
    script = tmp_path / "check_setup.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "CONVIT_SSL_DATA": str(tmp_path / "empty-data-root"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(script), str(tmp_path / "folder"), *TINY, f"run_dir={tmp_path / 'run'}"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.startswith(("run ", "worker ")))
    assert json.loads(reports["run"]) == {"vissl_at_import": [], "vissl_after_prepare_data": [],
                                          "train_images": 1437}  # digits' training split
    assert json.loads(reports["worker"]) == {"trunk": True, "seeded_samples": True}


def _imported_at_import(module: str) -> set:
    """The top-level packages that importing ``module`` imports, following the module-level imports in our modules'
    source (an import inside a function runs later, where it is used) and the packages above each module."""
    import ast
    import importlib.util

    seen, outside, pending = set(), set(), [module]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        if "." in name:
            pending.append(name.rpartition(".")[0])
        for node in ast.parse(open(importlib.util.find_spec(name).origin).read()).body:
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            else:
                continue
            for imported in names:
                if not imported.startswith("convit_ssl"):
                    outside.add(imported.split(".")[0])
                elif _is_module(imported):
                    pending.append(imported)
    return outside


def _is_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a name defined in a module, not a module
        return False


@pytest.mark.parametrize("module", ["convit_ssl.report", "convit_ssl.health", "convit_ssl.commands.demo"])
def test_what_reads_health_records_loads_neither_vissl_nor_classy_vision(module):
    outside = _imported_at_import(module)
    assert "torch" in outside  # the walk follows our modules down to what they use
    assert not {"vissl", "classy_vision"} & outside, outside
