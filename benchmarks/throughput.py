"""Throughput, FLOPs and peak memory of our ConViT against timm's ConViT and DeiT, side by side.

All models of a size class run in one process, interleaved round-robin after warm-up, so machine
noise hits them alike. Speed ratios are taken per round (ours against each model's step of the same
round) and summarised by their median and range: these ratios are what to read. Peak memory of a
training step is measured first, with each model alone in a fresh process (``--memory-batch`` images; a
model that runs out of memory is recorded as such and its speed is still measured). Prints a table and
writes JSON after every run.

How much faster than timm's ConViT ours can be depends on the host: the reference is slowed by
subnormal floats, which cost many cycles per operation on some CPUs and nothing on others. The
benchmark measures that penalty on the host and prints it with the results.

Inputs are an axis of their own: ``--resolutions 224 448 224/8`` runs every size at 224 px, at 448 px
and at 224 px with 8-px patches (IMG or IMG/PATCH; the patch is 16 px by default). timm's ConViT and DeiT
are fixed-size models and are built for each input (``img_size``, ``patch_size``).

    python benchmarks/throughput.py                                   # CPU: tiny and small, fp32, batch 32, 224 px
    python benchmarks/throughput.py --sizes tiny --resolutions 448 224/8   # the high-resolution targets
    python benchmarks/throughput.py --device cuda         # GPU: tiny, small, base; fp32 and bf16 autocast

Targets (CPU, fp32, batch 32), checked and printed after each run (``--check`` exits 1 on a miss). 224 px:
training >= 1.6x timm convit_tiny and >= 2.3x timm convit_small; >= 0.95x timm deit_tiny; for small,
FLOP-normalised training throughput >= 0.95x deit_small; inference >= 1.6x timm ConViT; peak memory of a
training step <= 0.8x timm ConViT's. 448 px, tiny: training >= 4x timm ConViT and >= 0.9x DeiT, peak memory
<= 0.3x timm ConViT's.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Tuple

import torch
import torch.nn.functional as F
from torch.utils import flop_counter

MODELS = ("convit_ssl", "timm_convit", "timm_deit")


class Resolution(NamedTuple):
    """One input of the benchmark: square images of ``img_size`` px cut into ``patch_size`` px patches."""

    img_size: int
    patch_size: int = 16

    @classmethod
    def parse(cls, text: str) -> "Resolution":
        """'224' or '224/8' (IMG or IMG/PATCH)."""
        try:
            resolution = cls(*(int(part) for part in text.split("/")))
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"resolution {text!r}: write IMG or IMG/PATCH in pixels, e.g. 448 or 224/8")
        if resolution.img_size % resolution.patch_size:
            raise argparse.ArgumentTypeError(f"resolution {text!r}: the image size must be a multiple of the patch size")
        return resolution

    def __str__(self) -> str:
        return f"{self.img_size}px" + ("" if self.patch_size == 16 else f"/p{self.patch_size}")

    def tag(self) -> str:
        """For file names: 224px, 224px_p8."""
        return str(self).replace("/", "_")


def build(name: str, size: str, resolution: Resolution) -> torch.nn.Module:
    """One of MODELS at ``size`` (tiny/small/base), without a classifier: (B, 3, IMG, IMG) -> (B, C)."""
    import timm

    from convit_ssl.models import create_trunk

    shape = dict(img_size=resolution.img_size, patch_size=resolution.patch_size)
    if name == "convit_ssl":
        trunk = create_trunk(f"convit_{size}", **shape)
        return _FirstOutput(trunk)
    if name == "timm_convit":
        return timm.create_model(f"convit_{size}", num_classes=0, **shape)
    return timm.create_model(f"deit_{size}_patch16_224", num_classes=0, **shape)


class _FirstOutput(torch.nn.Module):
    """Our trunk returns VISSL's list of features; benchmark the default one (final class token)."""

    def __init__(self, trunk: torch.nn.Module):
        super().__init__()
        self.trunk = trunk

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images)[0]


def _register_cpu_attention_flops() -> None:
    """torch's FlopCounterMode counts the CUDA attention kernels but not the CPU flash kernel."""
    ops = torch.ops.aten
    forward = getattr(ops, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(ops, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if forward is None or forward in flop_counter.flop_registry:
        return

    def forward_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query, key, value)

    def backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)

    flop_counter.register_flop_formula(forward, get_raw=False)(forward_flops)
    flop_counter.register_flop_formula(backward, get_raw=False)(backward_flops)


class Runner:
    """A model with its optimizer and the two timed steps."""

    def __init__(self, name: str, size: str, device: torch.device, batch: int, resolution: Resolution, bf16: bool):
        torch.manual_seed(0)
        self.name = name
        self.model = build(name, size, resolution).to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.images = torch.randn(batch, 3, resolution.img_size, resolution.img_size, device=device)
        self.device = device
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def train_step(self) -> None:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast:
            loss = self.model(self.images).float().square().mean()
        loss.backward()
        self.optimizer.step()

    def inference_step(self) -> None:
        self.model.eval()
        with torch.inference_mode(), self.autocast:
            self.model(self.images)

    def timed(self, step: Callable[[], None]) -> float:
        _synchronize(self.device)
        start = time.perf_counter()
        step()
        _synchronize(self.device)
        return time.perf_counter() - start

    def training_flops_per_image(self) -> float:
        """FLOPs of forward and backward per image, counted on one image: all but our tiny positional logits
        scale with the batch, and a step of timm's ConViT at 448 px and batch 32 takes minutes on a CPU."""
        _register_cpu_attention_flops()
        counter = flop_counter.FlopCounterMode(display=False)
        with counter:
            self.model.train()
            with self.autocast:
                loss = self.model(self.images[:1]).float().square().mean()
            loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        return counter.get_total_flops()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_speed(size: str, resolution: Resolution, args, device: torch.device, bf16: bool) -> Dict[str, dict]:
    """Images/s of each model (median over rounds) and its seconds per step in each round, round-robin."""
    runners = [Runner(name, size, device, args.batch, resolution, bf16) for name in MODELS]
    results = {r.name: {"flops_per_image": r.training_flops_per_image()} for r in runners}
    for kind in ("train", "inference"):
        times: Dict[str, List[float]] = {r.name: [] for r in runners}
        for round_index in range(args.warmup + args.rounds):
            for runner in runners:
                step = runner.train_step if kind == "train" else runner.inference_step
                elapsed = runner.timed(step)
                if round_index >= args.warmup:
                    times[runner.name].append(elapsed)
        for name, values in times.items():
            results[name][f"{kind}_img_per_s"] = args.batch / statistics.median(values)
            results[name][f"{kind}_seconds_per_round"] = values
    return results


def subnormal_penalty(repeats: int = 21) -> Dict[str, float]:
    """How much slower this CPU multiplies when operands are subnormal, as timm's ConViT's are.

    The operand is a real positional attention (a locally initialised ConViT-Ti GPSA layer, 224 px)
    with its subnormal entries kept, against the same matrix with them set to zero. Returns the
    fraction of subnormal entries and the time ratios subnormal/flushed of a batched matrix product
    and of an elementwise product (1.0: no penalty on this host).
    """
    from convit_ssl.models.convit import GatedPositionalSelfAttention, relative_positions

    layer = GatedPositionalSelfAttention(192, 4)
    layer.local_init()
    with torch.no_grad():
        logits = F.linear(relative_positions((14, 14), torch.device("cpu"), torch.float32),
                          layer.positional_proj.weight, layer.positional_proj.bias)
        with_subnormals = logits.permute(2, 0, 1).softmax(dim=-1).repeat(8, 1, 1)  # (32, N, N)
    tiny = torch.finfo(torch.float32).tiny
    flushed = with_subnormals.masked_fill(with_subnormals < tiny, 0.0)
    values = torch.randn(with_subnormals.shape[0], with_subnormals.shape[-1], 48)

    def seconds(operation: Callable[[torch.Tensor], torch.Tensor], matrix: torch.Tensor) -> float:
        start = time.perf_counter()
        operation(matrix)
        return time.perf_counter() - start

    def slowdown(operation: Callable[[torch.Tensor], torch.Tensor]) -> float:
        """Median over alternating repeats of (time with subnormals) / (time flushed)."""
        for matrix in (with_subnormals, flushed):  # warm-up
            seconds(operation, matrix)
        return statistics.median(
            seconds(operation, with_subnormals) / seconds(operation, flushed) for _ in range(repeats)
        )

    subnormal = (with_subnormals > 0) & (with_subnormals < tiny)
    return {
        "subnormal_fraction": subnormal.float().mean().item(),
        "matmul_slowdown": slowdown(lambda matrix: matrix @ values),
        "elementwise_slowdown": slowdown(lambda matrix: matrix * 0.5),
    }


def peak_memory_child(name: str, size: str, resolution: Resolution, args, device: torch.device, bf16: bool) -> int:
    """Bytes a training step needs on top of weights and optimizer state (this process alone)."""
    runner = Runner(name, size, device, args.batch, resolution, bf16)
    runner.train_step()  # optimizer state exists from here on
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        runner.train_step()
        return torch.cuda.max_memory_allocated(device) - baseline
    baseline = _rss_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident set size (VmHWM)
    runner.train_step()
    return _rss_bytes("VmHWM") - baseline


def cpu_name() -> str:
    """The host's CPU model, as /proc/cpuinfo names it (the benchmark's ratios depend on it)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_memory(size: str, resolution: Resolution, args, bf16: bool) -> Dict[str, dict]:
    """Run peak_memory_child for each model in a fresh process, at ``--memory-batch`` images.

    Returns per model ``{"train_peak_memory": bytes}``, or ``{"train_peak_memory_error": why}`` for a child
    that did not finish (killed for lack of memory, a CUDA out-of-memory error): the other figures stand.
    """
    peaks = {}
    # Large tensors go straight to mmap and back to the system when freed, so the peak RSS of
    # a step is the memory it needs, not what the allocator kept from earlier steps.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    for name in MODELS:
        command = [sys.executable, __file__, "--memory-child", name, "--sizes", size, "--device", args.device,
                   "--batch", str(args.memory_batch), "--threads", str(args.threads),
                   "--resolutions", f"{resolution.img_size}/{resolution.patch_size}"]
        if bf16:
            command.append("--bf16")
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode == 0:
            peaks[name] = {"train_peak_memory": int(done.stdout.strip().splitlines()[-1])}
        else:
            peaks[name] = {"train_peak_memory_error": child_failure(done.returncode, done.stderr)}
            print(f"  {name}: no peak memory at batch {args.memory_batch}, {resolution}: "
                  f"{peaks[name]['train_peak_memory_error']}")
    return peaks


def child_failure(returncode: int, stderr: str) -> str:
    """Why a memory child failed, in one line: a signal (SIGKILL is the kernel's out-of-memory killer) or its error."""
    if returncode < 0:
        signal_name = signal.Signals(-returncode).name
        return f"killed by {signal_name}" + (" (out of memory)" if signal_name == "SIGKILL" else "")
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"exit status {returncode}"


TARGETS = {
    # (resolution, size, metric, ratio name): minimum (or maximum for memory); CPU, fp32, batch 32
    (Resolution(224), "tiny", "train_img_per_s", "vs_timm_convit"): 1.6,
    (Resolution(224), "small", "train_img_per_s", "vs_timm_convit"): 2.3,
    (Resolution(224), "tiny", "train_img_per_s", "vs_timm_deit"): 0.95,
    (Resolution(224), "small", "train_flop_normalised", "vs_timm_deit"): 0.95,
    (Resolution(224), "tiny", "inference_img_per_s", "vs_timm_convit"): 1.6,
    (Resolution(224), "small", "inference_img_per_s", "vs_timm_convit"): 1.6,
    (Resolution(224), "tiny", "train_peak_memory", "vs_timm_convit"): 0.8,
    (Resolution(224), "small", "train_peak_memory", "vs_timm_convit"): 0.8,
    (Resolution(448), "tiny", "train_img_per_s", "vs_timm_convit"): 4.0,
    (Resolution(448), "tiny", "train_img_per_s", "vs_timm_deit"): 0.9,
    (Resolution(448), "tiny", "train_peak_memory", "vs_timm_convit"): 0.3,
}


def paired_speed_ratios(ours: List[float], theirs: List[float]) -> List[float]:
    """Speed of ours over theirs in each round: their seconds per step over ours, round by round."""
    return [their_seconds / our_seconds for our_seconds, their_seconds in zip(ours, theirs)]


def ratios(results: Dict[str, dict]) -> Tuple[Dict[str, float], Dict[str, List[float]]]:
    """Ratios ours/timm ConViT and ours/DeiT, and the range [min, max] of each per-round speed ratio.

    Speed ratios are medians of per-round ratios; the FLOP-normalised one multiplies the training
    speed ratio by ours/DeiT training FLOPs per image; memory is one measurement per model.
    """
    ours = results[MODELS[0]]
    out, spread = {}, {}
    for versus, theirs in zip(("vs_timm_convit", "vs_timm_deit"), (results[MODELS[1]], results[MODELS[2]])):
        for kind in ("train", "inference"):
            per_round = paired_speed_ratios(ours[f"{kind}_seconds_per_round"], theirs[f"{kind}_seconds_per_round"])
            out[f"{kind}_img_per_s/{versus}"] = statistics.median(per_round)
            spread[f"{kind}_img_per_s/{versus}"] = [min(per_round), max(per_round)]
        if "train_peak_memory" in ours and "train_peak_memory" in theirs:
            out[f"train_peak_memory/{versus}"] = ours["train_peak_memory"] / theirs["train_peak_memory"]
    flops = ours["flops_per_image"] / results[MODELS[2]]["flops_per_image"]
    out["train_flop_normalised/vs_timm_deit"] = out["train_img_per_s/vs_timm_deit"] * flops
    spread["train_flop_normalised/vs_timm_deit"] = [v * flops for v in spread["train_img_per_s/vs_timm_deit"]]
    return out, spread


def benchmark_run(size: str, resolution: Resolution, precision: str, args, device: torch.device) -> dict:
    """Memory (unless skipped), speed and FLOPs of the three models at one size, input and precision; prints them.

    Memory comes first, while this process holds no model, so that a child has the host's memory to itself.
    """
    bf16 = precision == "bf16"
    memory = {} if args.skip_memory else measure_memory(size, resolution, args, bf16)
    results = measure_speed(size, resolution, args, device, bf16)
    for name in MODELS:
        r = results[name]
        r.update(memory.get(name, {}))
        peak = f"{r['train_peak_memory'] / 2**20:14.0f}" if "train_peak_memory" in r else f"{'-':>14}"
        print(f"{str(resolution):9} {size:6} {precision:5} {name:12} {r['train_img_per_s']:12.2f} "
              f"{r['inference_img_per_s']:12.2f} {r['flops_per_image'] / 1e9:16.2f} {peak}")
    run_ratios, spread = ratios(results)
    for key, value in run_ratios.items():
        low_high = f" (rounds {spread[key][0]:.2f}-{spread[key][1]:.2f})" if key in spread else ""
        at_batch = f" (batch {args.memory_batch})" if "memory" in key and args.memory_batch != args.batch else ""
        print(f"  {key} = {value:.2f}{low_high}{at_batch}")
    reference_gap = statistics.median(paired_speed_ratios(
        results["timm_deit"]["train_seconds_per_round"], results["timm_convit"]["train_seconds_per_round"]))
    print(f"  timm DeiT trains {reference_gap:.2f}x as fast as timm ConViT here: ours/timm ConViT if ours "
          f"trained as fast as DeiT")
    return {"size": size, "img_size": resolution.img_size, "patch_size": resolution.patch_size,
            "precision": precision, "memory_batch": None if args.skip_memory else args.memory_batch,
            "models": results, "ratios": run_ratios, "ratio_range_over_rounds": spread,
            "timm_deit_over_timm_convit_train": reference_gap}


def check_targets(run: dict, args, device: torch.device) -> List[str]:
    """Print each target that applies to ``run`` (CPU, fp32, batch 32) as met, missed or not measured; return
    the ones not met. Memory ratios measured at another ``--memory-batch`` say so."""
    if device.type != "cpu" or run["precision"] != "fp32" or args.batch != 32:
        return []
    missed = []
    resolution = Resolution(run["img_size"], run["patch_size"])
    for (target_resolution, target_size, metric, versus), bound in TARGETS.items():
        key = f"{metric}/{versus}"
        if (target_resolution, target_size) != (resolution, run["size"]) or (args.skip_memory and "memory" in metric):
            continue
        sign = "<=" if "memory" in metric else ">="
        label = f"  target {resolution} {run['size']} {key} {sign} {bound}"
        if key not in run["ratios"]:
            errors = [f"{name}: {model['train_peak_memory_error']}" for name, model in run["models"].items()
                      if "train_peak_memory_error" in model]
            print(f"{label}: NOT MEASURED ({'; '.join(errors)})")
            missed.append(f"{resolution} {run['size']} {key} (not measured)")
            continue
        value = run["ratios"][key]
        ok = value <= bound if "memory" in metric else value >= bound
        at_batch = f" at batch {run['memory_batch']}" if "memory" in metric and run["memory_batch"] != args.batch else ""
        print(f"{label}: {value:.2f}{at_batch} {'met' if ok else 'MISSED'}")
        if not ok:
            missed.append(f"{resolution} {run['size']} {key}")
    return missed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--sizes", nargs="+", default=None, help="default: tiny small (+ base on CUDA)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--resolutions", nargs="+", type=Resolution.parse, default=[Resolution(224)],
                        help="inputs, IMG or IMG/PATCH in pixels (default: 224, 16-px patches), e.g. 224 448 224/8; "
                             "at 448 px timm's ConViT needs about 4x the memory and 10x the time of 224 px")
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=None,
                        help="default: fp32 on CPU, fp32 and bf16 (autocast) on CUDA")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads (default: all)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-batch", type=int, default=None,
                        help="images per step when measuring peak memory (default: --batch); a step's activations "
                             "grow with the batch, so a smaller one fits a host where timm's ConViT at 448 px does not")
    parser.add_argument("--check", action="store_true", help="exit 1 when a CPU fp32 target is missed")
    parser.add_argument("--out", default=None,
                        help="JSON output (default: benchmarks/results/throughput_<device>_<resolutions>.json)")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.memory_batch = args.memory_batch or args.batch
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if args.memory_child:
        print(peak_memory_child(args.memory_child, args.sizes[0], args.resolutions[0], args, device, args.bf16))
        return 0

    sizes = args.sizes or (["tiny", "small", "base"] if device.type == "cuda" else ["tiny", "small"])
    precisions = args.precisions or (["fp32", "bf16"] if device.type == "cuda" else ["fp32"])
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "host": cpu_name(),
              "threads": args.threads, "batch": args.batch, "resolutions": [str(r) for r in args.resolutions],
              "rounds": args.rounds, "torch": torch.__version__, "runs": []}
    if device.type == "cpu":
        report["host_subnormal_penalty"] = penalty = subnormal_penalty()
        print(f"host: a positional attention with {penalty['subnormal_fraction']:.1%} subnormal entries makes a "
              f"matmul {penalty['matmul_slowdown']:.2f}x and an elementwise product "
              f"{penalty['elementwise_slowdown']:.2f}x as slow as with them flushed")
    print(f"{'input':9} {'size':6} {'prec':5} {'model':12} {'train img/s':>12} {'infer img/s':>12} "
          f"{'train GFLOP/img':>16} {'step peak MiB':>14}")
    tags = "_".join(r.tag() for r in args.resolutions)
    out = Path(args.out or Path(__file__).parent / "results" / f"throughput_{device.type}_{tags}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    missed = []
    for precision in precisions:
        for resolution in args.resolutions:
            for size in sizes:
                run = benchmark_run(size, resolution, precision, args, device)
                missed += check_targets(run, args, device)
                report["runs"].append(run)
                out.write_text(json.dumps(report, indent=2))  # after every run: a later failure keeps this one
    print(f"wrote {out}")
    return 1 if (args.check and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
