"""The throughput benchmark and the GPU check run end to end (tiny inputs, CPU); ratios are paired round by round."""
import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).parents[1] / "benchmarks" / "throughput.py"
GPU_CHECK = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"


def _load_benchmark():
    import importlib.util

    spec = importlib.util.spec_from_file_location("throughput", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_speed_ratios_pair_each_round():
    throughput = _load_benchmark()
    ours = {"train_seconds_per_round": [1.0, 2.0, 1.0], "inference_seconds_per_round": [1.0, 1.0, 1.0],
            "flops_per_image": 2.0, "train_peak_memory": 50}
    convit = {"train_seconds_per_round": [2.0, 2.0, 3.0], "inference_seconds_per_round": [2.0, 2.0, 2.0],
              "flops_per_image": 2.0, "train_peak_memory": 100}
    deit = {"train_seconds_per_round": [1.0, 1.0, 1.0], "inference_seconds_per_round": [1.0, 1.0, 1.0],
            "flops_per_image": 1.0, "train_peak_memory": 40}
    ratios, spread = throughput.ratios({"convit_ssl": ours, "timm_convit": convit, "timm_deit": deit})
    # per round: 2/1, 2/2, 3/1 -> median 2, range 1-3 (not median(convit) / median(ours) = 2 / 1)
    assert ratios["train_img_per_s/vs_timm_convit"] == 2.0
    assert spread["train_img_per_s/vs_timm_convit"] == [1.0, 3.0]
    assert ratios["train_img_per_s/vs_timm_deit"] == 1.0
    assert ratios["train_flop_normalised/vs_timm_deit"] == 2.0
    assert ratios["train_peak_memory/vs_timm_convit"] == 0.5
    assert ratios["inference_img_per_s/vs_timm_convit"] == 2.0


def test_subnormal_probe_uses_the_real_positional_attention():
    penalty = _load_benchmark().subnormal_penalty(repeats=1)
    assert 0.05 < penalty["subnormal_fraction"] < 0.15  # about 8.6% at init, 224 px
    assert penalty["matmul_slowdown"] > 0 and penalty["elementwise_slowdown"] > 0


@pytest.mark.slow
def test_benchmark_runs_end_to_end(tmp_path):
    out = tmp_path / "throughput.json"
    command = [sys.executable, str(BENCHMARK), "--device", "cpu", "--sizes", "tiny", "--batch", "2",
               "--resolutions", "32", "32/8", "--warmup", "0", "--rounds", "2", "--threads", "1", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["resolutions"] == ["32px", "32px/p8"] and report["host"]
    assert [(run["img_size"], run["patch_size"]) for run in report["runs"]] == [(32, 16), (32, 8)]
    for run in report["runs"]:
        assert set(run["models"]) == {"convit_ssl", "timm_convit", "timm_deit"}
        for model in run["models"].values():
            assert model["train_img_per_s"] > 0 and model["inference_img_per_s"] > 0
            assert model["flops_per_image"] > 0 and model["train_peak_memory"] > 0
            assert len(model["train_seconds_per_round"]) == 2
        assert run["ratios"]["train_img_per_s/vs_timm_convit"] > 0
        low, high = run["ratio_range_over_rounds"]["train_img_per_s/vs_timm_convit"]
        assert low <= run["ratios"]["train_img_per_s/vs_timm_convit"] <= high
    # 8-px patches: 4x the tokens of 16-px ones, so more training FLOPs per image for every model
    for name in ("convit_ssl", "timm_convit", "timm_deit"):
        assert report["runs"][1]["models"][name]["flops_per_image"] > 2 * report["runs"][0]["models"][name]["flops_per_image"]
    assert "host_subnormal_penalty" in report
    assert "timm DeiT trains" in done.stdout


def test_resolution_argument():
    throughput = _load_benchmark()
    assert throughput.Resolution.parse("448") == (448, 16)
    assert throughput.Resolution.parse("224/8") == (224, 8)
    assert str(throughput.Resolution(224, 8)) == "224px/p8" and throughput.Resolution(224, 8).tag() == "224px_p8"
    for bad in ("224/", "big", "100/16"):
        with pytest.raises(argparse.ArgumentTypeError, match="resolution"):
            throughput.Resolution.parse(bad)


@pytest.mark.slow
def test_gpu_check_cpu_path(tmp_path):
    """The GPU check's code, on CPU at tiny sizes: parity with timm, compile, a DINO run, the benchmark; one JSON."""
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, str(GPU_CHECK), "--device", "cpu", "--out", str(out)], capture_output=True,
                          text=True, timeout=900, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["passed"] and set(report["checks"]) == {"parity", "compile", "dino", "throughput"}
    parity = {result["precision"]: result for result in report["checks"]["parity"]["result"]}
    assert set(parity) == {"fp32", "bf16", "fp16"}
    assert parity["fp32"]["output_error"] < 1e-5 and parity["fp32"]["gradient_error"] < 1e-4
    for precision, tolerance in (("bf16", 0.05), ("fp16", 0.01)):
        assert 0 < parity[precision]["output_error"] < tolerance  # autocast really ran in low precision
        assert parity[precision]["gradient_error"] < tolerance
        assert parity[precision]["timm_output_error"] > 0
    compiled = report["checks"]["compile"]["result"]
    assert compiled["output_error"] < 1e-4 and compiled["gradient_error"] < 1e-4
    dino = report["checks"]["dino"]["result"]
    assert dino["backend"] == "gloo" and dino["world_size"] == 1 and dino["amp"] is False
    assert len(dino["losses"]) == dino["iterations"] == 8 and all(math.isfinite(loss) for loss in dino["losses"])
    assert isinstance(dino["loss_falling"], bool)
    throughput = report["checks"]["throughput"]["result"]
    assert throughput["precision"] == "bf16" and [row["input"] for row in throughput["summary"]] == ["32/16", "64/16"]
    for row in throughput["summary"]:
        assert row["ratios"]["train_img_per_s/vs_timm_convit"] > 0 and row["peak_memory_mib"]["convit_ssl"] > 0


def test_a_memory_child_out_of_memory_keeps_the_other_figures(monkeypatch, capsys):
    """timm's ConViT-Ti at 448 px and batch 32 needs more than a 23 GB host has: the kernel kills its memory
    child. The run keeps every speed figure and the other models' memory, and the memory target reads
    'not measured', not met."""
    throughput = _load_benchmark()
    children = []

    def fake_run(command, **kwargs):
        name = command[command.index("--memory-child") + 1]
        children.append((name, command[command.index("--batch") + 1]))
        if name == "timm_convit":
            return subprocess.CompletedProcess(command, -9, "", "")
        return subprocess.CompletedProcess(command, 0, f"{100 * 2**20}\n", "")

    seconds = {"convit_ssl": 1.0, "timm_convit": 4.0, "timm_deit": 1.0}

    def fake_speed(size, resolution, args, device, bf16):
        return {name: {"flops_per_image": 1.0, "train_img_per_s": 32 / s, "inference_img_per_s": 32 / s,
                       "train_seconds_per_round": [s], "inference_seconds_per_round": [s]}
                for name, s in seconds.items()}

    monkeypatch.setattr(throughput.subprocess, "run", fake_run)
    monkeypatch.setattr(throughput, "measure_speed", fake_speed)
    args = argparse.Namespace(skip_memory=False, memory_batch=8, batch=32, device="cpu", threads=1)
    run = throughput.benchmark_run("tiny", throughput.Resolution(448), "fp32", args, throughput.torch.device("cpu"))
    assert children == [("convit_ssl", "8"), ("timm_convit", "8"), ("timm_deit", "8")]
    assert run["models"]["timm_convit"]["train_peak_memory_error"] == "killed by SIGKILL (out of memory)"
    assert run["ratios"]["train_img_per_s/vs_timm_convit"] == 4.0
    assert run["ratios"]["train_peak_memory/vs_timm_deit"] == 1.0
    assert "train_peak_memory/vs_timm_convit" not in run["ratios"]
    missed = throughput.check_targets(run, args, throughput.torch.device("cpu"))
    assert "448px tiny train_peak_memory/vs_timm_convit (not measured)" in missed
    assert "448px tiny train_img_per_s/vs_timm_convit" not in missed  # 4.0 meets >= 4
    printed = capsys.readouterr().out
    assert "NOT MEASURED (timm_convit: killed by SIGKILL (out of memory))" in printed
    assert "448px     tiny   fp32  timm_convit" in printed  # its speed row is printed


def test_child_failure_names_the_cause():
    throughput = _load_benchmark()
    assert throughput.child_failure(-9, "") == "killed by SIGKILL (out of memory)"
    assert throughput.child_failure(-11, "") == "killed by SIGSEGV"
    assert throughput.child_failure(1, "Traceback\n  ...\ntorch.OutOfMemoryError: CUDA out of memory.\n") == \
        "torch.OutOfMemoryError: CUDA out of memory."
