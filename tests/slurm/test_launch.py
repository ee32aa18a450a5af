"""The SLURM launcher against a real two-node SLURM cluster on this machine, and through ``--local``.

Every run is the tiny digits pretraining (the ``tiny`` fixture) on CPU with gloo.
"""
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from oracles import assert_same_probe, assert_same_training_state

from convit_ssl import launch
from convit_ssl.cli import main as convit_ssl

REPO = Path(__file__).resolve().parents[2]
CPU = ["--cpu", "--cpus-per-task", "1", "--time", "10"]


def run_launcher(*args, timeout=240):
    """``python launchers/slurm.py ARGS`` as a user runs it."""
    return subprocess.run([sys.executable, str(REPO / "launchers" / "slurm.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def submitted_ids(stdout):
    return re.findall(r"submitted \S+ job (\S+)", stdout)


def replaced(overrides, *new):
    """``overrides`` with the keys of ``new`` set to their new values."""
    keys = {o.split("=", 1)[0] for o in new}
    return [o for o in overrides if o.split("=", 1)[0] not in keys] + list(new)


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.3)


def ranks_joined(log_files, world_size):
    """The ranks that VISSL reports as initialised in one process group of ``world_size``."""
    text = "".join(Path(f).read_text() for f in log_files)
    assert f"world_size: {world_size}" in text
    return sorted({int(rank) for rank in re.findall(r"initialized host \S+ as rank (\d+)", text)})


def final_iteration(run_dir):
    checkpoint = launch.final_checkpoint(Path(run_dir))
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["iteration"]


# ------------------------------------------------------------------------------------------ SLURM
@pytest.mark.slow
def test_two_node_pretraining_then_linear_probe(slurm, tiny, tmp_path):
    probe_args = "--recipe digits --epochs 2 --lrs 0.1 1 --wds 0 --no-cache --quiet"
    done = run_launcher("--nodes", "2", *CPU, "--wait", "--then", f"linear-probe={probe_args}", *tiny)
    assert done.returncode == 0, done.stdout + done.stderr + slurm.logs()
    pretrain_id, probe_id = submitted_ids(done.stdout)
    run_dir = Path(re.search(r"job folder: (\S+)", done.stdout).group(1))
    assert run_dir.name.endswith(f"-{pretrain_id}")
    assert ranks_joined(run_dir.glob(f"{pretrain_id}_*_log.out"), world_size=2) == [0, 1]
    assert final_iteration(run_dir) == 2 * 2  # 2 epochs of 32 images, batch 8 on each of 2 nodes
    pretrain, probe = slurm.job_state(pretrain_id), slurm.job_state(probe_id)
    assert pretrain["NumNodes"] == "2" and probe["StartTime"] >= pretrain["EndTime"]
    (result,) = (json.loads(path.read_text()) for path in (run_dir / "linear-probe").glob("*.json"))
    # the chained probe ran at the pretraining's size, 2 nodes, and gives one process's numbers
    assert convit_ssl(["linear-probe", "--checkpoint", str(launch.final_checkpoint(run_dir)), *probe_args.split(),
                       "--device", "cpu", "--out", str(tmp_path / "one")]) == 0
    (one,) = (json.loads(path.read_text()) for path in (tmp_path / "one").glob("*.json"))
    assert_same_probe(result, one, world_size=2)


@pytest.mark.slow
def test_sweep_is_one_job_array(slurm, tiny):
    done = run_launcher("--nodes", "1", *CPU, "--wait", "--sweep", "config.OPTIMIZER.num_epochs=1,2", *tiny)
    assert done.returncode == 0, done.stdout + done.stderr + slurm.logs()
    ids = submitted_ids(done.stdout)
    assert len(ids) == 2 and len({i.split("_")[0] for i in ids}) == 1 and all("_" in i for i in ids)
    job_dir = Path(re.search(r"job folder: (\S+)", done.stdout).group(1)).parent
    assert final_iteration(job_dir / "num_epochs=1") == 4
    assert final_iteration(job_dir / "num_epochs=2") == 8


@pytest.mark.slow
def test_preempted_job_resumes_from_its_checkpoint(slurm, capsys, tiny):
    overrides = replaced(tiny, "config.OPTIMIZER.num_epochs=4", "config.DATA.TRAIN.DATA_LIMIT=64")
    args = launch.build_parser().parse_args(["--nodes", "2", *CPU, "--max-requeues", "4", *overrides])
    (pretrain,) = launch.submit(args, launch.make_plan(args))
    job_id = pretrain.job.job_id
    wait_for(lambda: (pretrain.run_dir / "model_phase0.torch").exists(), 120, "the first checkpoint")
    slurm.run("scancel", "--signal=USR2", job_id)  # what SLURM sends before the time limit
    wait_for(lambda: slurm.job_state(job_id).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), 180,
             "the requeued job to finish")
    state = slurm.job_state(job_id)
    assert state["JobState"] == "COMPLETED", pretrain.job.paths.stderr.read_text()
    assert int(state["Restarts"]) == 1
    log = pretrain.job.paths.stdout.read_text()  # node 0, both attempts
    assert f"Requeued job {job_id} (3 remaining timeouts)" in log  # a 10-minute job always counts as timed out
    # the training processes saved at their next step after the signal, and the requeued run resumed there
    marker = json.loads((pretrain.run_dir / "preemption_checkpoint.json").read_text())
    resumed_from = log.split("Resume from file")[1].splitlines()[0]
    assert resumed_from.endswith(marker["checkpoint"]) and marker["iteration"] >= 4, (resumed_from, marker)
    assert final_iteration(pretrain.run_dir) == 4 * 4  # every iteration done once: nothing lost, nothing repeated


@pytest.mark.slow
def test_hand_requeue_resumes_into_the_same_run(slurm, tiny):
    """``scontrol requeue`` sends SIGTERM (then SIGKILL after KillWait): the ranks save at their next step, and the
    requeued run ends bit for bit where a run that was left alone ends (both 2-node jobs run side by side)."""
    overrides = replaced(tiny, "config.OPTIMIZER.num_epochs=4", "config.DATA.TRAIN.DATA_LIMIT=64",
                         "config.LOG_FREQUENCY=1")
    args = launch.build_parser().parse_args(["--nodes", "2", *CPU, *overrides])
    (straight,) = launch.submit(args, launch.make_plan(args))
    (pretrain,) = launch.submit(args, launch.make_plan(args))
    job_id = pretrain.job.job_id
    wait_for(lambda: (pretrain.run_dir / "model_phase0.torch").exists(), 120, "the first checkpoint")
    slurm.run("scontrol", "requeue", job_id)
    finished = ("COMPLETED", "FAILED", "CANCELLED")
    wait_for(lambda: int(slurm.job_state(job_id).get("Restarts", 0)) >= 1
             and slurm.job_state(job_id).get("JobState") in finished
             and slurm.job_state(straight.job.job_id).get("JobState") in finished, 300, "both jobs to finish")
    state = slurm.job_state(job_id)
    assert state["JobState"] == "COMPLETED" and int(state["Restarts"]) == 1, pretrain.job.paths.stderr.read_text()
    assert slurm.job_state(straight.job.job_id)["JobState"] == "COMPLETED", straight.job.paths.stderr.read_text()
    marker = json.loads((pretrain.run_dir / "preemption_checkpoint.json").read_text())
    assert marker["iteration"] >= 4, marker  # saved on the signal, after the first epoch's checkpoint
    log = pretrain.job.paths.stdout.read_text()
    kind, number = re.search(r"Resume from file: \S*model_(iteration|phase)(\d+)\.torch", log).groups()
    resumed_at = int(number) if kind == "iteration" else (int(number) + 1) * 4  # 4 iterations an epoch
    # the run goes on until SIGKILL and may checkpoint again: it resumes from the signal's checkpoint or a later one
    assert resumed_at >= marker["iteration"], (kind, number, marker)
    final = [torch.load(launch.final_checkpoint(item.run_dir), map_location="cpu", weights_only=True)
             for item in (straight, pretrain)]
    assert final[1]["iteration"] == 4 * 4
    assert_same_training_state(*final)
    logged = [[(s["iter"], s["loss"]) for s in map(json.loads, (item.run_dir / "stdout.json").read_text().splitlines())]
              for item in (straight, pretrain)]
    assert logged[0] == logged[1] and len(logged[0]) == 4 * 4


@pytest.mark.slow
def test_chained_evaluation_is_cancelled_when_its_pretraining_is(slurm, tiny):
    args = launch.build_parser().parse_args(["--nodes", "1", *CPU, "--then", "knn=--recipe digits --ks 5", *tiny])
    pretrain, knn = launch.submit(args, launch.make_plan(args))
    slurm.run("scancel", pretrain.job.job_id)
    wait_for(lambda: knn.job.job_id not in slurm.queue(), 60, "the chained kNN job to leave the queue")
    assert slurm.job_state(knn.job.job_id).get("JobState") in ("CANCELLED", None), slurm.job_state(knn.job.job_id)


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
@pytest.mark.parametrize("option, message", [
    (["--partition", "nope"], "unknown partition 'nope': this cluster has test"),
    (["--nodes", "3"], "--nodes 3 but partition 'test' has 2 nodes"),
])
@pytest.mark.slow
def test_cluster_errors_before_submitting(slurm, capsys, option, message, dry_run, tiny):
    assert launch.main([*dry_run, *option, *CPU, *tiny]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert slurm.queue() == []


# ------------------------------------------------------------------------------------------ no SLURM needed
def test_a_partition_list_is_checked_partition_by_partition():
    """sbatch takes --partition small,big (the job starts in the first that can run it): each must exist, and one
    must have the nodes."""
    def check(partition, nodes):
        args = launch.build_parser().parse_args(["--nodes", str(nodes), "--partition", partition, "config=dino"])
        return launch.check_partition(args, {"small": 2, "big": 4}, "small")

    assert check("small,big", 3) == "small,big"
    with pytest.raises(launch.LaunchError, match="unknown partition 'nope': this cluster has big, small"):
        check("small,nope", 1)
    with pytest.raises(launch.LaunchError, match="--nodes 5 but partition 'small,big' has 4 nodes"):
        check("small,big", 5)


@pytest.mark.slow
def test_local_two_node_pretraining_then_knn(job_env, tiny):
    done = run_launcher("--local", "--nodes", "2", *CPU, "--then", "knn=--recipe digits --ks 5 --no-cache --quiet",
                        *tiny)
    assert done.returncode == 0, done.stdout + done.stderr
    run_dir = Path(re.search(r"job folder: (\S+)", done.stdout).group(1))
    assert ranks_joined(run_dir.glob("*_log.out"), world_size=2) == [0, 1]
    assert final_iteration(run_dir) == 4
    assert "knn job" in done.stdout and list((run_dir / "knn").glob("*.json")), "the kNN evaluation wrote no result"


# 32 images make no batch of 8 images x 8 GPUs: the dry runs train on all 1,437 digits
ALL_IMAGES = "config.DATA.TRAIN.DATA_LIMIT=-1"


def test_dry_run_prints_the_sbatch_script_and_config(job_env, capsys, tiny):
    assert launch.main(["--dry-run", "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu", "--qos", "high",
                        "--slurm", "mail-type=END", "--max-requeues", "5", *tiny, ALL_IMAGES]) == 0
    out = capsys.readouterr().out
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --qos=high", "#SBATCH --mail-type=END", "#SBATCH --requeue",
                 "#SBATCH --signal=USR2@120", "srun --unbuffered"):
        assert line in out
    assert "NUM_NODES: 4" in out and "NUM_PROC_PER_NODE: 8" in out and "BACKEND: nccl" in out
    assert "# cluster checks skipped: " in out and "partition and node count not checked" in out  # no SLURM here
    assert not job_env.exists(), "a dry run created the job folder"


def test_chained_evaluation_is_cancelled_with_its_pretraining(job_env):
    args = launch.build_parser().parse_args(["--dry-run", "--partition", "gpu", "config=dino"])
    executor = launch.make_executor(args, str(job_env), nodes=1, gpus=1, name="knn-x", partition="gpu",
                                    dependency="afterok:42")
    script = executor._make_submission_file_text(executor._submitit_command_str, "x")
    assert "#SBATCH --dependency=afterok:42" in script and "#SBATCH --kill-on-invalid-dep=yes" in script


@pytest.mark.slow
def test_sweep_dry_run_is_one_array(job_env, capsys, tiny):
    """Both presets keep the width of tiny's head (192): a convit_small point would not take it and is refused."""
    assert launch.main(["--dry-run", "--partition", "gpu", "--sweep", "model=convit_tiny,deit_tiny",
                        "--sweep", "config.OPTIMIZER.num_epochs=1,2", *tiny, "trunk.local_up_to_layer=0",
                        ALL_IMAGES]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --array=0-3%4" in out
    names = re.findall(r"# resolved config for (\S+):", out)
    assert names == ["model=convit_tiny,num_epochs=1", "model=convit_tiny,num_epochs=2",
                     "model=deit_tiny,num_epochs=1", "model=deit_tiny,num_epochs=2"]


@pytest.mark.parametrize("option, message", [
    (["config=nope"], "unknown config 'nope'"),
    (["--job-dir", "{file}/run-%j"], "is not writable"),
    (["--time", "soon"], "--time 'soon' is not a SLURM time"),
    (["--then", "probe=x"], "choose linear-probe or knn"),
    (["--then", "knn=--ks 20 --bogus"], "--then knn: unknown arguments --bogus"),
    (["--then", "linear-probe=--epochs many"], "--then linear-probe: argument --epochs: invalid int value"),
    (["--nodes", "2", "--gpus-per-node", "2"], "use --nodes 1, or --cpu"),
    (["--nodes", "two"], "argument --nodes: invalid int value: 'two' (see launchers/slurm.py --help)"),
    (["--sweep", "model"], "is not KEY=V1,V2"),
    (["run_dir=/somewhere", "--job-dir", "/elsewhere"], "run_dir= and --job-dir both name the job folder"),
    (["--sweep", "model=convit_tiny,deit_tiny,convit_tiny"], "two points of --sweep share the run folder "
                                                              "model=convit_tiny"),
    (["--sweep", "data=a/b,a_b"], "two points of --sweep share the run folder data=a_b"),
    (["--sweep", "model=convit_tiny,deit_tiny", "--sweep", "model=convit_small"], "--sweep model is given twice"),
    (["--sweep", "config.DISTRIBUTED.NUM_NODES=1,2"], "--sweep config.DISTRIBUTED.NUM_NODES: the launcher sets it"),
    (["--then", "knn=--checkpoint other.torch"], "--then knn: --checkpoint is the pretraining's final checkpoint"),
    (["--then", "finetune=--checkpoint random --recipe digits"], "--then finetune: --checkpoint is the pretraining"),
    (["--then", "knn=--recipe nope"], "--then knn: unknown recipe 'nope'"),
    (["--then", "knn=--ks 0"], "--then knn: --ks"),
    (["--then", "finetune=--recipe nope"], "--then finetune: unknown fine-tuning recipe 'nope'"),
    (["--time", "2"], "--signal-delay-s 120 is not below --time 2 (120 s)"),
    (["--job-dir", "{file}-runs/run-%a"], "names no folder outside a job array: use %j"),
    (["--job-dir", "{file}-runs/%j/%t"], "gives every node (task) a folder of its own: use %j"),
    (["--sweep", "model=convit_tiny,deit_tiny", "--then", "finetune=--recipe digits run_dir={file}-ft"],
     "--then finetune: run_dir="),
    (["--then", "finetune=--recipe digits run_dir={file}-ft", "--then", "finetune=--recipe digits run_dir={file}-ft"],
     "would be the run folder of more than one fine-tuning"),
])
def test_errors_are_one_line_before_anything_starts(job_env, capsys, tmp_path, option, message, tiny):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    argv = ["--local", *tiny, *[o.format(file=a_file) for o in option]]
    assert launch.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not job_env.exists()


def test_missing_submitit_is_a_one_line_error(job_env, capsys, monkeypatch, tiny):
    monkeypatch.setitem(sys.modules, "submitit", None)
    assert launch.main(["--local", *CPU, *tiny]) == 2
    assert "submitit is not installed: pip install" in capsys.readouterr().err


@pytest.mark.parametrize("text, minutes", [("90", 90), ("10:30", 11), ("1:30:00", 90), ("2-12", 3600),
                                           ("3-00:00:00", 4320), ("1-0:1", 1441)])
def test_slurm_time_formats_in_minutes(text, minutes):
    assert launch.parse_minutes(text) == minutes


# ------------------------------------------------------------------------------------------ evaluation jobs
EVAL_TINY = ["--random", "convit_tiny", "--trunk-option", "patch_size=8", "--trunk-option", "embed_dim=48",
             "--trunk-option", "depth=3", "--trunk-option", "local_up_to_layer=2", "--quiet"]


@pytest.fixture
def checkpoint(tmp_path):
    from convit_ssl.checkpoint import to_timm_state_dict
    from convit_ssl.models import create_trunk

    path = tmp_path / "tiny.pth"
    torch.save({"model": to_timm_state_dict(create_trunk("convit_tiny", img_size=32, patch_size=8, embed_dim=48,
                                                         depth=3, local_up_to_layer=2))}, path)
    return path


def test_an_evaluation_dry_run_is_one_job_with_a_rank_per_gpu(job_env, capsys, checkpoint):
    assert launch.main(["--dry-run", "--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu", "linear-probe",
                        "--checkpoint", str(checkpoint), "--recipe", "imagenet1k"]) == 0
    out = capsys.readouterr().out
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --requeue", "#SBATCH --signal=USR2@120",
                 "#SBATCH --job-name=linear-probe-imagenet1k", "srun --unbuffered"):
        assert line in out
    assert (f"# evaluation: convit-ssl linear-probe --checkpoint {checkpoint} --recipe imagenet1k on 2 node(s) x 8 "
            f"process(es) = 16 rank(s)") in out
    assert launch.main(["--dry-run", "--cpu", "--nodes", "3", "--job-name", "knn", "knn", *EVAL_TINY]) == 0
    out = capsys.readouterr().out  # 'knn' as the value of --job-name is not the command
    assert "#SBATCH --ntasks-per-node=1" in out and "--gpus-per-node" not in out and "#SBATCH --job-name=knn" in out
    assert "on 3 node(s) x 1 process(es) = 3 rank(s)" in out
    assert not job_env.exists(), "a dry run created the job folder"


def test_chained_evaluations_run_at_the_pretraining_size_or_the_one_given(job_env, capsys, tiny):
    then = ["--then", "knn=--recipe digits --ks 5"]
    assert launch.main(["--dry-run", "--nodes", "2", "--partition", "gpu", *then, *tiny, ALL_IMAGES]) == 0
    assert "--ks 5 on 2 node(s) x 8 process(es) = 16 rank(s) (afterok" in capsys.readouterr().out
    assert launch.main(["--dry-run", "--nodes", "2", "--eval-nodes", "1", "--gpus-per-node", "4", "--partition", "gpu",
                        *then, *tiny, ALL_IMAGES]) == 0
    assert "--ks 5 on 1 node(s) x 4 process(es) = 4 rank(s) (afterok" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["knn", "--checkpoint", "{missing}"], "does not exist"),
    (["knn"], "knn: one of the arguments --checkpoint --random is required"),
    (["knn", *EVAL_TINY, "--bogus"], "knn: unknown arguments --bogus; see convit-ssl knn --help"),
    (["knn", *EVAL_TINY, "--ks", "many"], "knn: argument --ks: invalid int value: 'many'"),
    (["--then", "knn=--ks 5", "knn", *EVAL_TINY], "knn is a job of its own: --sweep and --then belong to a "),
    (["config=dino", "knn", *EVAL_TINY], "unrecognized arguments: config=dino (see launchers/slurm.py --help)"),
    (["--nodes", "0", "knn", *EVAL_TINY], "--nodes and --gpus-per-node must be at least 1"),
    (["--nodes", "2", "knn", *EVAL_TINY], "use --nodes 1, or --cpu"),
    (["knn", *EVAL_TINY, "--recipe", "nope"], "knn: unknown recipe 'nope'"),
    (["finetune", "--checkpoint", "random", "--recipe", "nope"], "finetune: unknown fine-tuning recipe 'nope'"),
    (["--time", "1", "--signal-delay-s", "60", "knn", *EVAL_TINY], "--signal-delay-s 60 is not below --time 1 (60 s)"),
    (["--job-dir", "{missing}-runs/%a", "knn", *EVAL_TINY], "names no folder outside a job array: use %j"),
    (["--job-dir", "{missing}-runs/%j-%t", "knn", *EVAL_TINY], "gives every node (task) a folder of its own"),
])
def test_evaluation_job_errors_are_one_line_before_anything_starts(job_env, capsys, tmp_path, argv, message):
    argv = ["--local", *[a.format(missing=tmp_path / "missing.torch") for a in argv]]
    assert launch.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not job_env.exists()


@pytest.mark.slow
def test_local_two_process_knn_job_equals_one_process(job_env, capsys):
    """``--local --cpu --nodes 2 knn``: two processes of one gloo group, rank 0 writes; the numbers are one
    process's, exactly."""
    knn = ["knn", *EVAL_TINY, "--ks", "1", "20", "--no-cache"]
    done = run_launcher("--local", "--nodes", "2", *CPU, *knn)
    assert done.returncode == 0, done.stdout + done.stderr
    job_dir = Path(re.search(r"job folder: (\S+)", done.stdout).group(1))
    (two,) = [json.loads(path.read_text()) for path in job_dir.glob("knn-*.json")]
    assert convit_ssl([*knn, "--out", str(job_dir / "one")]) == 0
    (one,) = [json.loads(path.read_text()) for path in (job_dir / "one").glob("*.json")]
    assert two["manifest"]["world_size"] == 2 and two["accuracy"] == one["accuracy"]


FINETUNE_TINY = ["finetune", "--checkpoint", "random", "--recipe", "digits", "--labels", "20%", "trunk.embed_dim=32",
                 "trunk.depth=2", "trunk.local_up_to_layer=1", "config.DATA.NUM_DATALOADER_WORKERS=0",
                 "config.OPTIMIZER.num_epochs=2"]


@pytest.mark.slow
def test_local_two_process_gloo_finetune_job(job_env):
    """``--local --cpu --nodes 2 finetune``: VISSL's engine on 2 gloo processes (one a node), every node prepares
    the same label lists, the epoch scores are summed over both ranks' halves of the held-out and test images,
    and rank 0 writes the result in the job folder."""
    done = run_launcher("--local", "--nodes", "2", *CPU, *FINETUNE_TINY, timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    job_dir = Path(re.search(r"job folder: (\S+)", done.stdout).group(1))
    (result,) = [json.loads(path.read_text()) for path in job_dir.glob("finetune-digits-20.json")]
    assert result["manifest"]["models"][0]["source"] == "random"
    run_dir = job_dir / "run"
    config = (run_dir / "train_config.yaml").read_text()
    assert "NUM_NODES: 2" in config and "BACKEND: gloo" in config
    records = [json.loads(line) for line in (run_dir / "finetune_eval.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in records] == [0, 1]
    assert records[-1]["test_images"] == 360
    assert records[-1]["heldout_images"] == result["label_subset"]["heldout_images"] > 0
    assert len(list((run_dir / "finetune_inputs").glob("*.npy"))) == 4  # the same lists from both nodes


def test_then_finetune_is_checked_by_its_own_parser():
    from convit_ssl.launch import LaunchError, parse_then

    assert parse_then(["finetune=--recipe digits --labels 10%"]) == [("finetune", ["--recipe", "digits", "--labels",
                                                                                  "10%"])]
    with pytest.raises(LaunchError, match="--then finetune: .*--recipe"):
        parse_then(["finetune=--labels 10%"])


def test_a_requeued_evaluation_is_the_same_evaluation_at_its_next_attempt():
    """What submitit requeues on SLURM's signal: the same command, arguments and run, a new rendezvous attempt (the
    streamed probe then resumes from the heads it saved in --out)."""
    job = launch.EvaluationJob("linear-probe", ["--recipe", "digits", "--stream"], cpu=True, run_dir="runs/x-1")
    again = job.checkpoint()
    assert isinstance(again.function, launch.EvaluationJob) and vars(again.function) == {**vars(job), "attempt": 1}
    assert vars(again.function.checkpoint().function)["attempt"] == 2


def test_each_chained_evaluation_has_a_folder_of_its_own(job_env, monkeypatch):
    """Two --then finetune (two label fractions) must not train into one run folder: the second gets finetune-2/."""
    job_ids = iter(range(1, 100))

    class Executor:
        def __init__(self, folder):
            self.folder = Path(folder)

        def submit(self, job):
            return SimpleNamespace(job_id=str(next(job_ids)), paths=SimpleNamespace(folder=self.folder))

    monkeypatch.setattr(launch, "make_executor", lambda args, folder, **options: Executor(folder))
    args = launch.build_parser().parse_args(["--cpu", "config=dino"])
    evaluations = launch.parse_then(["finetune=--recipe digits --labels 10%", "finetune=--recipe digits --labels 1%",
                                     "knn=--recipe digits"])
    plan = launch.Plan([launch.Point(["config=dino"])], str(job_env / "run-%j"), "x", evaluations)
    submitted = launch.submit(args, plan)
    run = job_env / "run-%j"
    assert [(item.kind, item.run_dir) for item in submitted[1:]] == [
        ("finetune", run / "finetune"), ("finetune", run / "finetune-2"), ("knn", run / "knn")]


def evaluation_argv(monkeypatch, folder, job):
    """The ``convit-ssl`` arguments that ``job`` (an ``EvaluationJob``) runs with, as one process in ``folder``."""
    import submitit

    from convit_ssl import cli

    calls = []
    monkeypatch.setattr(submitit, "JobEnvironment", lambda: SimpleNamespace(
        paths=SimpleNamespace(folder=folder), num_tasks=1, global_rank=0, cluster="local"))
    monkeypatch.setattr(cli, "main", lambda argv: calls.append(argv) or 0)
    monkeypatch.setattr(launch, "final_checkpoint", lambda run_dir: run_dir / "final.torch")
    job()
    return calls[0]


def test_then_help_names_only_what_the_launcher_adds(monkeypatch, tmp_path):
    then = next(action for action in launch.build_parser()._actions if "--then" in action.option_strings)
    added = re.search(r"\(([^()]*) (?:is|are) added\)", then.help).group(1)
    job = launch.EvaluationJob("knn", ["--recipe", "digits"], cpu=False, run_dir=str(tmp_path / "run"))
    argv = evaluation_argv(monkeypatch, tmp_path, job)
    assert [flag for flag in re.findall(r"--[\w-]+", added) if flag not in argv] == [], (added, argv)


@pytest.mark.parametrize("option, message", [
    (["--mem-gb", "0.0001"], "--mem-gb 0.0001 is under 1 MB"),
    (["--mem-gb", "0"], "--mem-gb 0 is under 1 MB"),
    (["--signal-delay-s", "-5"], "--signal-delay-s -5 is negative"),
    (["--job-name", "mine/dino"], "--job-name 'mine/dino' would make nested folders"),
    (["--job-name", ""], "--job-name '' is empty"),
])
def test_memory_signal_delay_and_job_name_are_checked_in_one_line(job_env, capsys, checkpoint, option, message,
                                                                  tiny):
    """sbatch reads --mem=0MB as all of the node's memory, a negative delay is no signal before the limit, and a job
    name names the job's folder: a / in it would nest them."""
    for launched in (tiny, ["knn", "--checkpoint", str(checkpoint)]):
        assert launch.main(["--dry-run", *CPU, *option, *launched]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not job_env.exists()


def test_an_evaluation_named_after_a_recipe_file_gets_a_plain_job_name(job_env, capsys, checkpoint, tmp_path):
    recipe = tmp_path / "configs" / "x" / "my.yaml"
    recipe.parent.mkdir(parents=True)
    recipe.write_text("defaults: [digits]\n")
    assert launch.main(["--dry-run", *CPU, "linear-probe", "--checkpoint", str(checkpoint), "--recipe",
                        str(recipe)]) == 0
    out = capsys.readouterr().out
    script = dict(line.split("=", 1) for line in out.splitlines() if line.startswith("#SBATCH --") and "=" in line)
    assert script["#SBATCH --job-name"] == "linear-probe-my"
    assert script["#SBATCH --output"] == f"{job_env / 'linear-probe-my-%j'}/%j_0_log.out"


@pytest.mark.parametrize("words", [["knn", "--ou", "{mine}"], ["knn", "--dev", "cuda"], ["--then", "knn=--ou {mine}"]])
def test_an_abbreviated_option_is_not_replaced_by_the_launchers(job_env, capsys, checkpoint, tmp_path, words, tiny):
    """The job adds --out (and --device with --cpu) unless ARGS give it: an abbreviation of it is refused, not lost."""
    words = [word.format(mine=tmp_path / "mine") for word in words]
    launched = [*words, "--checkpoint", str(checkpoint)] if words[0] == "knn" else [*words, *tiny]
    assert launch.main(["--dry-run", *CPU, *launched]) == 2
    err = capsys.readouterr().err
    assert "unknown arguments --" in err and "spell options out in full" in err and err.count("\n") == 1, err
