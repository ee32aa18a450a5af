"""PreemptionCheckpointHook across two ranks without a per-step synchronisation, and the log truncation of a resume."""
import json
import subprocess
import sys
import textwrap

import pytest

from convit_ssl.hooks import truncate_json_lines

# One rank of a 2-process gloo group: six training steps, SIGUSR2 to rank 1 alone before step 2 ends. Every
# all-reduce is recorded: none may go to the default group (NCCL on GPUs, where .item() stalls the GPU).
RANK = textwrap.dedent("""
    import json, os, signal, sys, types
    import torch, torch.distributed as dist
    from convit_ssl.resume_hooks import PreemptionCheckpointHook

    rank, init, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    groups = []
    all_reduce = dist.all_reduce
    def recording_all_reduce(tensor, *args, group=None, **kwargs):
        groups.append("default" if group is None else "own")
        return all_reduce(tensor, *args, group=group, **kwargs)
    dist.all_reduce = recording_all_reduce
    saved = []
    checkpointer = types.SimpleNamespace(_checkpoint_model=lambda task, **kw: saved.append(kw["mode_num"]))
    task = types.SimpleNamespace(train=True, iteration=0, hooks=[checkpointer], checkpoint_folder=out,
                                 device=torch.device("cpu"))
    hook = PreemptionCheckpointHook()
    hook.on_start(task)
    for iteration in range(1, 7):
        task.iteration = iteration
        if rank == 1 and iteration == 2:
            os.kill(os.getpid(), signal.SIGUSR2)
        hook.on_step(task)
    hook.on_end(task)
    json.dump({"saved": saved, "groups": sorted(set(groups))}, open(f"{out}/rank{rank}.json", "w"))
""")


@pytest.mark.slow  # two processes import torch
def test_ranks_save_at_the_same_step_without_a_collective_on_the_default_group(tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    ranks = [subprocess.Popen([sys.executable, "-c", RANK, str(rank), init, str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [process.communicate(timeout=120)[0] for process in ranks]
    assert [process.returncode for process in ranks] == [0, 0], outputs
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    saved = [result["saved"] for result in results]
    assert saved[0] == saved[1] and len(saved[0]) == 1 and saved[0][0] in (2, 3), saved  # once, together
    assert all(result["groups"] == ["own"] for result in results), results
    assert (tmp_path / "preemption_checkpoint.json").is_file()


def test_truncation_keeps_the_lines_up_to_the_checkpoint(tmp_path):
    log = tmp_path / "stdout.json"
    lines = [json.dumps({"iter": i}) + "\n" for i in range(6)]
    log.write_text("".join(lines) + '{"iter": 6, "lo')  # a line cut short by kill -9
    with open(log, "a") as stream:  # VISSL's append stream, open before the cut, writes at the new end
        assert truncate_json_lines(log, lambda record: record["iter"] < 4) == 3
        assert log.read_text() == "".join(lines[:4])
        assert truncate_json_lines(log, lambda record: record["iter"] < 4) == 0
        stream.write(lines[4])
    assert log.read_text() == "".join(lines[:5])
