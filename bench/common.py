"""Shared helpers of the benchmark scripts: command line, timing, peak memory, machine facts, tables, JSON.

Timing: the median wall-clock time of a few calls after a warm-up; on CUDA the clock is read only
after torch.cuda.synchronize(), so that it covers the queued kernels.
Peak memory of one call:
- CUDA: torch.cuda.max_memory_allocated() above what was allocated before the call (tensors only;
  the caching allocator's reserve and the CUDA context are not counted).
- CPU: the peak resident set size (VmHWM in /proc/self/status, reset before the call through
  /proc/self/clear_refs) above the resident size before the call. That is a property of the whole
  process, so every case runs in a child process of its own (`run_isolated`), and its first call is
  the one measured: once freed, small blocks stay in the C allocator's heap and a second call would
  reuse them without raising the resident size.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/data.py, bench/metrics.py and bench/train.py have the names of the project's data.py, metrics.py
# and train.py: the project root goes first on sys.path, so that `import data` finds the project's modules
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

GIB, MIB = 2.0**30, 2.0**20


# ----------------------------------------------------------------------------- command line


def arguments(doc: str) -> argparse.ArgumentParser:
    """The flags every benchmark takes; a script adds its own, then calls `parse`."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of under a minute on a CPU")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the measured code runs")
    p.add_argument("--out", type=Path, default=Path("bench/results"),
                   help="folder for NAME.json (relative paths: from the repository root)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (None: torch's default, one per core); 1 on a machine shared with "
                        "other jobs, whose threads would otherwise wait for each other")
    return p


def parse(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parses the flags (argv, default the command line's); --out is made absolute against the
    repository root; refuses cuda without a GPU; sets the torch threads."""
    args = parser.parse_args(argv)
    args.out = args.out if args.out.is_absolute() else ROOT / args.out
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine; use --device cpu")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return args


# ----------------------------------------------------------------------------- timing and memory


def synchronize(device) -> None:
    """Waits for the queued CUDA kernels; nothing on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_seconds(call, device, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall-clock seconds of `repeats` calls of call(), after `warmup` untimed ones."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        call()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_median_seconds(calls: dict, device, repeats: int = 5, warmup: int = 1) -> dict:
    """{name: median wall-clock seconds} of several callables timed side by side: after `warmup`
    untimed rounds, each of `repeats` rounds times every callable once, in turn, so that a change of
    the machine's load during the measurement affects all of them alike."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            synchronize(device)
            start = time.perf_counter()
            call()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _status_kib(field: str) -> int:
    """A "VmRSS"-like field of /proc/self/status, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}: CPU peak memory needs Linux")


class PeakMemory:
    """`with PeakMemory(device) as peak: ...` sets peak.bytes to the most memory the block added
    (see the module docstring for what is counted on each device)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.bytes = 0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = _status_kib("VmRSS") * 1024
            # "5" sets the peak back to the current size (Linux >= 4.0); where it is refused, the peak
            # is the child process's, which before this point held only the case's set-up
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.start
        else:
            self.bytes = max(0, _status_kib("VmHWM") * 1024 - self.start)


def time_and_memory(call, device, repeats: int = 3) -> tuple[float, int]:
    """(median seconds of `repeats` calls after a warm-up, peak bytes added by one call).

    CPU: the first call is measured for memory and is also the warm-up (call this first thing in a
    fresh process, see `run_isolated`); a few MiB of first-time code paths count with it.
    CUDA: the warm-up comes before the memory call, so that one-time allocations (cuBLAS's
    workspace) are not counted.
    """
    if torch.device(device).type == "cuda":
        call()
    else:  # start the thread pool and the BLAS library, whose one-time buffers would count otherwise
        torch.randn(8, 64, 64).matmul(torch.randn(64, 64)).softmax(dim=-1).topk(2)
    with PeakMemory(device) as peak:
        call()
    return median_seconds(call, device, repeats, warmup=0), peak.bytes


def run_isolated(case, device, **kwargs) -> dict:
    """Runs case(device=device, **kwargs), a function returning a dict, so that its peak memory is
    its own: on the CPU in a forked child process (one per case), on CUDA in this process (PeakMemory
    resets the peak statistics). A child that dies (killed for memory) gives {"error": ...}."""
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        return case(device=device, **kwargs)
    # fork: the child starts with the modules this process has imported, in a few milliseconds
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("fork")) as pool:
        try:
            return pool.submit(case, device=device, **kwargs).result()
        except BrokenProcessPool:
            return {"error": "the child process died (out of memory?)"}


# ----------------------------------------------------------------------------- reports


def machine_info(device) -> dict:
    """CPU model, cores, load, memory, library versions, torch threads; the GPU when on CUDA."""
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
              if line.startswith("model name")] if cpuinfo.is_file() else []
    info = {"cpu": models[0] if models else platform.processor(), "logical_cpus": os.cpu_count(),
            "load_average_1min": os.getloadavg()[0],
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "platform": platform.platform()}
    if torch.device(device).type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                    gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / GIB, 1),
                    matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                    cudnn_allow_tf32=torch.backends.cudnn.allow_tf32)
    return info


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    """Prints a plain-text table: the first column left-aligned, the others right-aligned."""
    cells = [[str(c) for c in row] for row in [header] + rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    for k, row in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def json_ready(value):
    """An argument as JSON keeps it: paths (also in lists) as strings."""
    if isinstance(value, list):
        return [json_ready(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def write_json(name: str, args: argparse.Namespace, results) -> Path:
    """Writes {benchmark, date, args, machine, results} to <args.out>/<name>.json."""
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{name}.json"
    payload = {"benchmark": name, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "args": {k: json_ready(v) for k, v in vars(args).items()},
               "machine": machine_info(args.device), "results": results}
    path.write_text(json.dumps(payload, indent=1))
    print(f"\nwrote {path}")
    return path
