"""Nothing secret from the environment lands in a run folder; VISSL logged every variable into log.txt."""
import pytest

from tiny_training import run, train_command

SECRETS = {"AWS_SECRET_ACCESS_KEY": "aws-secret-0451", "HF_TOKEN": "hf-token-0451",
           "SLURM_AUTH_TOKEN": "slurm-token-0451", "CONVIT_SSL_API_KEY": "convit-key-0451"}


@pytest.mark.slow
def test_no_secret_of_the_environment_in_the_run_folder(tmp_path, train_env):
    run_dir = tmp_path / "run"
    # two processes: VISSL logs the environment in the worker it spawns, the path a cluster run takes
    run(train_command(run_dir, "config.OPTIMIZER.num_epochs=1", "config.DISTRIBUTED.NUM_PROC_PER_NODE=2"),
        dict(train_env, **SECRETS))
    files = [path for path in run_dir.rglob("*") if path.is_file()]
    assert (run_dir / "model_final_checkpoint_phase0.torch") in files
    for path in files:
        content = path.read_bytes()
        assert not [name for name, value in SECRETS.items() if value.encode() in content], path
    log = (run_dir / "log.txt").read_text()
    assert "OMP_NUM_THREADS:\t1" in log and "other environment variables not logged" in log


def test_logged_environment_is_the_allow_list_without_secret_names():
    from convit_ssl.vissl_glue import logged_environment

    environment = {"CUDA_VISIBLE_DEVICES": "0,1", "NCCL_DEBUG": "INFO", "SLURM_JOB_ID": "12", "OMP_NUM_THREADS": "1",
                   "RANK": "3", "PYTHONHASHSEED": "0", "HOME": "/home/someone", "PATH": "/usr/bin", **SECRETS}
    assert logged_environment(environment) == {"CUDA_VISIBLE_DEVICES": "0,1", "NCCL_DEBUG": "INFO",
                                               "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "RANK": "3",
                                               "SLURM_JOB_ID": "12"}
