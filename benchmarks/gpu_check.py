"""GPU readiness in one command: parity with timm, torch.compile, a short DINO run and the benchmark; one JSON.

For a bare machine with one NVIDIA GPU, Python 3.12, torch and timm preinstalled and no network. The other
packages come as wheels from a local folder (``pip install --no-index --no-deps``): ``make gpu-check
WHEELS=folder`` installs them and runs this script from the repository, in at most 8 minutes. Fill the folder
beforehand on a machine with network access, the same platform and Python 3.12 (fvcore, iopath and antlr4 come
as sources, which this builds into wheels): ``python3.12 -m pip wheel --no-deps -w folder vissl==0.1.6
classy-vision==0.7.0 fvcore iopath yacs tabulate termcolor portalocker tqdm hydra-core omegaconf
antlr4-python3-runtime==4.9.3 pyyaml submitit cloudpickle scikit-learn scipy joblib threadpoolctl matplotlib
contourpy cycler fonttools kiwisolver pyparsing python-dateutil six packaging 'setuptools<81'`` (those not
already on the machine).

Checks, each recorded in the JSON with its numbers and ``passed``:

1. ``parity``: our trunk loaded from timm's ConViT weights against timm, same inputs, train mode. float32
   (TF32 off): outputs within 1e-5 and every gradient within 1e-4 of timm's (relative to the largest
   entry). bfloat16 and float16 autocast (float16 with a scaled loss, as VISSL's AMP does): our output and
   gradients within 5% and 1% of float32 timm's; timm's own autocast error is recorded beside them.
2. ``compile``: ``torch.compile`` of our trunk, a training step: output and gradients within 1e-4 of eager.
3. ``dino``: ``convit-ssl train config=dino`` (our recipe; NCCL on one GPU with AMP, gloo on CPU) for a fixed
   number of iterations on a synthetic image folder written to a temporary data root: every iteration ran
   and logged a finite loss, with the expected backend, AMP and world size 1. Whether the loss falls (mean
   of the last quarter below that of the second; the first is left out) is recorded as ``loss_falling`` and
   reported, not judged: DINO's loss rises during its first iterations by design, as student and teacher
   start as one network (a loss below log K) and the centring flattens the teacher's targets; on CPU at
   tiny sizes it went from 10.79 to the plateau log(65536) = 11.09 in 25 iterations and then fell by 1e-3
   in the next 55.
4. ``throughput``: ``benchmarks/throughput.py`` in bfloat16 autocast at batch 128, 224 px and 448 px, tiny
   size, against timm's ConViT and DeiT (ratios, peak memory); recorded, not judged. At 448 px timm's
   ConViT-Ti keeps about 50 GB of attention matrices for backward (our count): a smaller GPU fails this check.

``--device cpu`` runs the same code at tiny sizes (CI runs it, so the script is known to work):

    python benchmarks/gpu_check.py                     # CUDA, the sizes above
    python benchmarks/gpu_check.py --device cpu        # tiny sizes, a few minutes on one core
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Dict, Iterator, List

import torch

ROOT = Path(__file__).resolve().parents[1]

# Per device: model sizes and run lengths. CPU sizes only show that every code path works.
SETTINGS = {
    "cuda": dict(
        parity=dict(archs=["convit_tiny", "convit_small"], img_size=224, batch=8),
        compile=dict(arch="convit_tiny", overrides=dict(img_size=224), batch=8),
        dino=dict(model="convit_tiny", trunk=[], crops=[], image_size=256, batch=32, workers=8, iterations=50),
        throughput=dict(sizes=["tiny"], resolutions=["224", "448"], batch=128, rounds=3, precision="bf16"),
    ),
    "cpu": dict(
        parity=dict(archs=["convit_tiny"], img_size=64, batch=2),
        compile=dict(arch="convit_tiny", batch=2, overrides=dict(
            img_size=32, patch_size=8, embed_dim=36, depth=3, num_heads=9, local_up_to_layer=2)),
        dino=dict(model="convit_tiny", trunk=["trunk.embed_dim=32", "trunk.depth=2", "trunk.local_up_to_layer=1",
                                              "trunk.img_size=32", "trunk.patch_size=4"],
                  crops=["config.CONVIT_SSL.GLOBAL_CROP=32", "config.CONVIT_SSL.LOCAL_CROP=16"],
                  image_size=40, batch=8, workers=0, iterations=8),
        throughput=dict(sizes=["tiny"], resolutions=["32", "64"], batch=2, rounds=1, precision="bf16"),
    ),
}

PARITY_TOLERANCES = {"fp32": (1e-5, 1e-4), "bf16": (0.05, 0.05), "fp16": (0.01, 0.01)}  # (output, gradients)
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
FP16_LOSS_SCALE = 2.0**16  # VISSL's AMP scales the loss: float16 gradients would underflow without it
COMPILE_TOLERANCE = 1e-4
# A softmax ignores a shift of its logits: this gradient is zero in exact arithmetic, rounding noise in practice.
ZERO_GRADIENT = "positional_proj.bias"


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """max |ours - reference| / max |reference|."""
    return ((ours.double() - reference.double()).abs().max() / reference.double().abs().max()).item()


@contextlib.contextmanager
def full_float32(device: torch.device) -> Iterator[None]:
    """No TF32 in CUDA matrix products or convolutions: float32 parity means float32 arithmetic."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def training_step(model: torch.nn.Module, images: torch.Tensor, weights: torch.Tensor, precision: str,
                  parameter_names: List[str]):
    """Output (float32) and {name: gradient} of mean(output * weights), under autocast for bf16/fp16."""
    model.zero_grad(set_to_none=True)
    dtype = AUTOCAST_DTYPES[precision]
    with torch.autocast(images.device.type, dtype=dtype) if dtype else nullcontext():
        output = model(images)
    output = (output[0] if isinstance(output, list) else output).float()
    scale = FP16_LOSS_SCALE if precision == "fp16" else 1.0
    ((output * weights).mean() * scale).backward()
    return output.detach(), {name: p.grad / scale for name, p in zip(parameter_names, model.parameters())}


def check_parity(device: torch.device, archs: List[str], img_size: int, batch: int) -> List[dict]:
    """Our trunk against timm's ConViT with the same weights, per arch and precision."""
    import timm

    from convit_ssl.checkpoint import from_timm_state_dict, to_timm_state_dict

    results = []
    for arch in archs:
        torch.manual_seed(0)
        reference = timm.create_model(arch, num_classes=0, img_size=img_size).to(device).train()
        trunk, _ = from_timm_state_dict(reference.state_dict())
        trunk = trunk.to(device).train()
        timm_names = [name for name, _ in reference.named_parameters()]
        our_names = list(to_timm_state_dict(trunk))  # our parameters in our order, named as timm names them
        assert len(our_names) == len(timm_names), "the trunk has tensors that are not parameters"
        images = torch.randn(batch, 3, img_size, img_size, device=device)
        weights = torch.randn(batch, trunk.embed_dim, device=device)
        with full_float32(device):
            expected, expected_grads = training_step(reference, images, weights, "fp32", timm_names)
        for precision, (output_tolerance, gradient_tolerance) in PARITY_TOLERANCES.items():
            with full_float32(device) if precision == "fp32" else nullcontext():
                ours, ours_grads = training_step(trunk, images, weights, precision, our_names)
                theirs, theirs_grads = training_step(reference, images, weights, precision, timm_names)
            gradient_errors = {name: relative_error(grad, expected_grads[name])
                               for name, grad in ours_grads.items() if not name.endswith(_timm_name(ZERO_GRADIENT))}
            worst = max(gradient_errors, key=gradient_errors.get)
            result = {
                "arch": arch, "precision": precision, "img_size": img_size, "batch": batch,
                "output_error": relative_error(ours, expected),
                "gradient_error": gradient_errors[worst], "worst_gradient": worst,
                "timm_output_error": relative_error(theirs, expected),
                "timm_gradient_error": max(relative_error(grad, expected_grads[name])
                                           for name, grad in theirs_grads.items()
                                           if not name.endswith(_timm_name(ZERO_GRADIENT))),
                "tolerance": {"output": output_tolerance, "gradients": gradient_tolerance},
            }
            result["passed"] = result["output_error"] <= output_tolerance and result["gradient_error"] <= gradient_tolerance
            results.append(result)
    return results


def _timm_name(ours: str) -> str:
    return ours.replace("positional_proj", "pos_proj")


def check_compile(device: torch.device, arch: str, overrides: dict, batch: int) -> dict:
    """torch.compile of our trunk: one training step against eager."""
    from convit_ssl.models import create_trunk

    torch.manual_seed(0)
    trunk = create_trunk(arch, **overrides).to(device).train()
    names = [name for name, _ in trunk.named_parameters()]
    size = trunk.grid_size[0] * trunk.patch_size
    images = torch.randn(batch, 3, size, size, device=device)
    weights = torch.randn(batch, trunk.embed_dim, device=device)
    with full_float32(device):
        eager, eager_grads = training_step(trunk, images, weights, "fp32", names)
        start = time.perf_counter()
        compiled, compiled_grads = training_step(torch.compile(trunk), images, weights, "fp32", names)
        seconds = time.perf_counter() - start
    gradient_error = max(relative_error(compiled_grads[name], eager_grads[name])
                         for name in names if not name.endswith(ZERO_GRADIENT))
    result = {"arch": arch, "overrides": overrides, "batch": batch, "compile_and_step_seconds": seconds,
              "output_error": relative_error(compiled, eager), "gradient_error": gradient_error,
              "tolerance": COMPILE_TOLERANCE}
    result["passed"] = result["output_error"] <= COMPILE_TOLERANCE and gradient_error <= COMPILE_TOLERANCE
    return result


def write_synthetic_images(folder: Path, count: int, size: int, classes: int = 4) -> None:
    """``count`` PNG images in ``classes`` class folders: each class a colour and an orientation of stripes,
    with random phase, frequency and noise, so that views of one image share something to learn."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    grid = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for index in range(count):
        label = index % classes
        angle = math.pi * label / classes
        frequency = rng.uniform(3, 6)
        stripes = np.sin(2 * math.pi * frequency * (math.cos(angle) * grid[0] + math.sin(angle) * grid[1])
                         + rng.uniform(0, 2 * math.pi))
        colour = np.eye(3)[label % 3] * 0.6 + 0.2
        pixels = 0.5 + 0.4 * stripes[..., None] * colour + 0.1 * rng.standard_normal((size, size, 3))
        class_folder = folder / f"class{label}"
        class_folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((255 * pixels.clip(0, 1)).astype(np.uint8)).save(class_folder / f"{index:05d}.png")


def check_dino(device: torch.device, model: str, trunk: List[str], crops: List[str], image_size: int, batch: int,
               workers: int, iterations: int, workdir: Path) -> dict:
    """``convit-ssl train config=dino`` for ``iterations`` steps (one epoch) on synthetic images."""
    from convit_ssl import data

    data_root, run_dir = workdir / "data", workdir / "dino_run"
    for split, count in (("train", iterations * batch), ("val", batch)):
        write_synthetic_images(data_root / "synthetic" / split, count, image_size)
    data.register_dataset("synthetic", data_root / "synthetic" / "train", data_root / "synthetic" / "val",
                          root=data_root, kind="synthetic image folder", data_file="imagenet1k")  # its crops
    command = [
        sys.executable, "-m", "convit_ssl", "train", "config=dino", f"model={model}", "data=synthetic", *trunk, *crops,
        f"run_dir={run_dir}", "config.OPTIMIZER.num_epochs=1", f"config.DATA.TRAIN.BATCHSIZE_PER_REPLICA={batch}",
        f"config.DATA.NUM_DATALOADER_WORKERS={workers}", "config.DISTRIBUTED.NUM_PROC_PER_NODE=1",
        f"config.MACHINE.DEVICE={'gpu' if device.type == 'cuda' else 'cpu'}", "config.LOG_FREQUENCY=1",
        "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=false",
        # A run of a few dozen steps: the recipe's peak learning rate at this batch (it scales it by batch / 256)
        f"config.OPTIMIZER.param_schedulers.lr.auto_lr_scaling.base_lr_batch_size={batch}",
    ]
    env = dict(os.environ, CONVIT_SSL_DATA=str(data_root), PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=workdir)
    seconds = time.perf_counter() - start
    result = {"model": model, "trunk_overrides": trunk, "batch": batch, "iterations": iterations,
              "seconds": seconds, "returncode": done.returncode}
    log = run_dir / "stdout.json"  # VISSL's log of every LOG_FREQUENCY-th iteration, one JSON per line
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    if done.returncode != 0 or not records:
        result.update(passed=False, output_tail=(done.stdout + done.stderr)[-4000:])
        return result
    losses = [record["loss"] for record in records]
    quarter = max(1, len(losses) // 4)
    second_quarter, last_quarter = statistics.mean(losses[quarter:2 * quarter]), statistics.mean(losses[-quarter:])
    result.update(
        logged_iterations=[record["iter"] for record in records], losses=losses,
        second_quarter_mean=second_quarter, last_quarter_mean=last_quarter, loss_falling=last_quarter < second_quarter,
        peak_memory_mib=records[-1].get("peak_mem(M)"), **_how_it_ran(run_dir),
    )
    # AMP and NCCL on CUDA; on CPU `convit-ssl train` runs gloo without AMP
    expected = dict(backend="nccl", amp=True) if device.type == "cuda" else dict(backend="gloo", amp=False)
    result["passed"] = (all(math.isfinite(loss) for loss in losses) and len(records) == iterations
                        and result["world_size"] == 1 and all(result[key] == value for key, value in expected.items()))
    return result


def _how_it_ran(run_dir: Path) -> dict:
    """Backend and world size from the config the run recorded; AMP from VISSL's log ("Setting AMP: ...")."""
    import yaml

    from convit_ssl.run_folder import CONFIG_FILE

    config = yaml.safe_load((run_dir / CONFIG_FILE).read_text())
    log = (run_dir / "log.txt").read_text() if (run_dir / "log.txt").is_file() else ""
    return {"backend": config["DISTRIBUTED"]["BACKEND"],
            "world_size": config["DISTRIBUTED"]["NUM_NODES"] * config["DISTRIBUTED"]["NUM_PROC_PER_NODE"],
            "amp": config["MODEL"]["AMP_PARAMS"]["USE_AMP"] and "Setting AMP" in log}


def check_throughput(device: torch.device, sizes: List[str], resolutions: List[str], batch: int, rounds: int,
                     precision: str, workdir: Path) -> dict:
    """benchmarks/throughput.py at these sizes and resolutions: its JSON report, with a summary of each run."""
    out = workdir / "throughput.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--device", device.type,
               "--precisions", precision, "--batch", str(batch), "--rounds", str(rounds), "--sizes", *sizes,
               "--resolutions", *resolutions, "--threads", str(torch.get_num_threads()), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"passed": False, "command": command[1:], "output_tail": (done.stdout + done.stderr)[-4000:]}
    report = json.loads(out.read_text())
    summary = [{"size": run["size"], "input": f"{run['img_size']}/{run['patch_size']}", "ratios": run["ratios"],
                "peak_memory_mib": {name: model["train_peak_memory"] / 2**20 if "train_peak_memory" in model
                                    else model["train_peak_memory_error"] for name, model in run["models"].items()}}
               for run in report["runs"]]
    return {"passed": True, "batch": batch, "precision": precision, "summary": summary, "report": report}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"),
                        help="the JSON of results (default: benchmarks/results/gpu_check.json)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["parity", "compile", "dino", "throughput"],
                        help="checks to leave out")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: torch sees no CUDA device here; run it on the GPU machine, or pass --device cpu")
        return 2
    device = torch.device(args.device)
    settings = SETTINGS[device.type]
    import timm

    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "timm": timm.__version__, "python": sys.version.split()[0], "checks": {}}
    checks: Dict[str, Callable[[Path], object]] = {
        "parity": lambda workdir: check_parity(device, **settings["parity"]),
        "compile": lambda workdir: check_compile(device, **settings["compile"]),
        "dino": lambda workdir: check_dino(device, workdir=workdir, **settings["dino"]),
        "throughput": lambda workdir: check_throughput(device, workdir=workdir, **settings["throughput"]),
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as workdir:
        for name, check in checks.items():
            if name in args.skip:
                continue
            began = time.perf_counter()
            result = check(Path(workdir))
            passed = all(r["passed"] for r in result) if isinstance(result, list) else result["passed"]
            report["checks"][name] = {"passed": passed, "seconds": time.perf_counter() - began, "result": result}
            print(f"{name}: {'passed' if passed else 'FAILED'} ({time.perf_counter() - began:.0f} s)", flush=True)
            if name == "dino" and "losses" in result:
                print(f"  DINO loss {result['losses'][0]:.4f} -> {result['losses'][-1]:.4f}, "
                      f"{'falling' if result['loss_falling'] else 'not falling'} after the first quarter", flush=True)
    report["seconds"] = time.perf_counter() - start
    report["passed"] = all(check["passed"] for check in report["checks"].values())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"{'all checks passed' if report['passed'] else 'FAILED'} in {report['seconds']:.0f} s; wrote {out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
