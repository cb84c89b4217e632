"""How a process runs a model, for train.py and eval.py alike: which model a method name builds
(`METHODS`), on which device, with how many CPU threads and which allocator setting, in which
memory format, at which precision, compiled or not, and, under torchrun, in which process group
with which share of the samples.

    device     --device, else cuda when there is one, else cpu (`resolve_device`)
    threads    --threads, else torch's default (the cores; $OMP_NUM_THREADS under torchrun)
    precision  --precision auto | fp32 | bf16: bf16 autocast of the forward passes (`autocast`) where
               the device computes bf16 natively, or forced (`resolve_precision`)
    processes  torchrun's RANK / WORLD_SIZE / LOCAL_RANK: one process group (nccl on GPUs, gloo on
               CPUs) around the run (`distributed_run`); each process evaluates every world-th
               sample (`shard`) and rank 0 gathers the results (`gather`)

Nothing here knows a metric or a training loss; the model files and data.py are the floor below.
"""
import contextlib
import ctypes
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

import data
from idif import IDIF, IDIFConfig
from mvad import MVAD, MVADConfig
from patchcore import PatchCore, PatchCoreConfig
from simplenet import SimpleNet, SimpleNetConfig
from uniad import UniAD, UniADConfig

# name -> (config dataclass, model): every model has anomaly_map(images, view_mask) -> (B, V, H, W)
METHODS = {"mvad": (MVADConfig, MVAD), "idif": (IDIFConfig, IDIF), "patchcore": (PatchCoreConfig, PatchCore),
           "uniad": (UniADConfig, UniAD), "simplenet": (SimpleNetConfig, SimpleNet)}


# ----------------------------------------------------------------------------- device, threads, memory


def resolve_device(flag: str | None) -> torch.device:
    """--device as a torch.device (None: cuda if available, else cpu), with one-line errors."""
    try:
        device = torch.device(flag or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise data.UserError(f"--device {flag}: not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise data.UserError(f"--device {flag}: CUDA is not available on this machine; use --device cpu")
    return device


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def reuse_freed_memory() -> None:
    """Lets the C allocator keep freed memory for the next tensors instead of returning it to the
    system. glibc serves blocks above a threshold (at most 32 MiB) with fresh pages from the kernel
    and unmaps them when freed, so every large temporary (a padded feature map, an attention matrix)
    costs page faults and a kernel zero-fill of its pages, on every call (README, Performance: the
    plain MVAS spent more than half of its time there). mallopt exists only in glibc: elsewhere
    (macOS, Windows) this does nothing."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)  # heap (reused) instead of fresh mappings up to 1 GiB
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)  # keep up to 1 GiB of free heap in the process
    except (OSError, AttributeError):
        pass


def setup_process(threads: int | None) -> None:
    """CPU settings for a run: torch's threads when --threads is given (else torch's default, the
    cores, or $OMP_NUM_THREADS as torchrun sets it), reuse_freed_memory(). On an idle 2-core machine
    2 threads took 1.55 s per MVAD step against 2.7 s for 1; with another process keeping one core
    busy 2 threads took 5.2 s against 3.0 s for 1 (README, Performance): there --threads 1 is faster."""
    if threads is not None and threads < 1:
        raise data.UserError(f"--threads {threads}: must be at least 1 (or leave it out for the default)")
    if threads is not None:
        torch.set_num_threads(threads)
    reuse_freed_memory()


def place(model: torch.nn.Module, device) -> torch.nn.Module:
    """Moves the model to `device`, on a CPU in the channels-last memory format, where oneDNN's
    convolutions are faster: a training step 2-3% faster for MVAD and 9-16% for IDIF on the 2-core
    machine of the README (bench/train.py measures both layouts). GPU runs keep the default layout,
    the one their README figures were measured with."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if torch.device(device).type == "cpu" else model


# ----------------------------------------------------------------------------- precision and compilation


PRECISIONS = ("auto", "fp32", "bf16")  # --precision: auto (resolve_precision), float32, or bf16 autocast
# The CPU instruction sets that compute bf16 products in hardware (the names of torch.cpu.get_capabilities()
# and of /proc/cpuinfo): Intel's AMX tiles (Xeon from Sapphire Rapids on) and AVX-512's bf16 dot products
# (Xeon Cooper Lake; AMD from Zen 4 on). Without them PyTorch emulates bf16 with float32 arithmetic and casts.
BF16_INSTRUCTIONS = ("amx_bf16", "avx512_bf16")


def cpu_bf16_instructions() -> list[str]:
    """Which of BF16_INSTRUCTIONS this CPU has, as torch.cpu.get_capabilities() reports them (cpuinfo,
    PyTorch's CPU feature detection; torch 2.14 has it), else as /proc/cpuinfo's flags (Linux)."""
    if hasattr(torch.cpu, "get_capabilities"):
        capabilities = torch.cpu.get_capabilities()
        return [name for name in BF16_INSTRUCTIONS if capabilities.get(name)]
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: no flags to read, no bf16 claimed
        return []
    return [name for name in BF16_INSTRUCTIONS if name in flags]


def cuda_bf16(device: torch.device) -> bool:
    """Whether the GPU computes bf16 natively: torch.cuda.is_bf16_supported(including_emulation=False),
    compute capability 8.0 on (Ampere, Hopper; before it bf16 is emulated), or any ROCm GPU."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # a torch without the argument (before 2.4): the capability itself
        return bool(torch.version.hip) or torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_precision(flag: str, device) -> tuple[str, str]:
    """The precision a run uses for --precision `flag` on `device` ("fp32" or "bf16") and why, for the
    start-up line. "auto": bf16 autocast where the device computes bf16 natively (a CUDA GPU with
    cuda_bf16, a CPU with one of BF16_INSTRUCTIONS), float32 elsewhere: where bf16 is emulated it is
    slower than float32 (a training step about 15x on a 2-core AMD EPYC with AVX2 only), where it
    is native faster (0.62x to 0.69x on a 2-core AMD EPYC with AVX512-BF16; README, Performance).
    An ARM CPU's bf16 instructions are not counted: not measured. "fp32" and "bf16" force either."""
    if flag != "auto":
        return flag, f"--precision {flag}"
    device = torch.device(device)
    if device.type == "cuda":
        return ("bf16", "auto: the GPU computes bf16") if cuda_bf16(device) else ("fp32", "auto: the GPU emulates bf16")
    found = cpu_bf16_instructions()
    if found:
        return "bf16", f"auto: the CPU has {' and '.join(name.upper() for name in found)}"
    return "fp32", f"auto: no bf16 instructions on this CPU ({torch.backends.cpu.get_cpu_capability()})"


def autocast(device, precision: str):
    """The forward passes' autocast context: bf16 for precision "bf16", a no-op for "fp32".

    In bf16: the convolutions, matrix products and attention of the models (autocast's lower-precision
    ops) in the training steps and in the evaluation's anomaly-map pass, and their backward.
    In float32: the weights, gradients and optimizer state (autocast casts copies); the losses and
    their reductions (the model files cast the features first); the anomaly maps from the feature
    distances on (cosine distance, upsampling, mvad.gaussian_blur; PatchCore's patch features and
    distances); the BatchNorm calibration of random-init encoders and PatchCore's memory bank (outside
    autocast); the metrics (metrics.py, float64 on the CPU)."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")


def compile_model(module, device):
    """torch.compile(module); on a GPU with CUDA graphs (mode "reduce-overhead"), which removes the
    kernel-launch overhead that bounds the MVAS blocks there."""
    return torch.compile(module, mode="reduce-overhead" if torch.device(device).type == "cuda" else None)


def accelerate(anomaly_map, device, compile: bool, precision: str):
    """A model's anomaly_map method, compiled (compile_model) and/or under bf16 autocast."""
    fn = compile_model(anomaly_map, device) if compile else anomaly_map

    def run(images, view_mask=None):
        with autocast(device, precision):
            return fn(images, view_mask)
    return run


# ----------------------------------------------------------------------------- several processes


def distributed_context() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    if "RANK" not in os.environ:
        return 0, 1, 0
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])


@contextlib.contextmanager
def distributed_run(device: torch.device, world: int, local_rank: int):
    """The process's device and, for several processes (torchrun), the torch.distributed group
    (nccl on GPUs, gloo on CPUs) around the run. A plain "cuda" becomes the GPU of LOCAL_RANK
    (GPU 0 for one process). Yields the device."""
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield device
    finally:
        if world > 1:
            dist.destroy_process_group()


def process_group() -> tuple[int, int]:
    """(rank, number of processes) of the torch.distributed group this process has joined (under
    torchrun: eval.py's command line or train.py); (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(num_samples: int, rank: int, world: int) -> list[int]:
    """The indices of the samples that process `rank` of `world` evaluates: every world-th from
    `rank` on. Strided, as the official code's DistributedSampler(shuffle=False) (lewandofskee/MVAD
    data/__init__.py), but without its padding, which repeats samples to even out the shards. Each
    shard holds every category in about equal parts, so the processes go through the categories
    together. The order of the samples does not matter for any metric: the merge sorts them back."""
    return list(range(rank, num_samples, world))


def sharded_loader(dataset, batch_size: int, workers: int, device) -> tuple[DataLoader, list[int], int]:
    """This process's shard of `dataset` (`shard`) in batches, in order, pinned for a GPU.
    Returns (the loader, the shard's indices into the dataset, this process's rank)."""
    rank, world = process_group()
    indices = shard(len(dataset), rank, world)
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, num_workers=workers,
                        pin_memory=torch.device(device).type == "cuda")
    return loader, indices, rank


def gather(part, everywhere: bool = False) -> list | None:
    """Every process's `part` (any picklable object; tensors on the CPU) as a list in rank order:
    on rank 0 only (None on the others), or on every process with `everywhere`. One process: [part]."""
    rank, world = process_group()
    if world == 1:
        return [part]
    parts = [None] * world
    if everywhere:
        dist.all_gather_object(parts, part)
        return parts
    dist.gather_object(part, parts if rank == 0 else None, dst=0)
    return parts if rank == 0 else None
