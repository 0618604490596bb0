"""Where and in what precision to run: cuda, then mps, then cpu; bf16 where the hardware has it."""

import ctypes
import functools
import os
import sys

import torch


def pick_device(name: str = "auto") -> torch.device:
    """cuda, then mps, then cpu; or exactly the device asked for."""
    if name != "auto":
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for but CUDA is not available: use --device cpu")
        if device.type == "cuda" and device.index is None:  # under torchrun, one GPU per process
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"device {name!r} asked for but MPS is not available: use --device cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# What bf16 training buys on a CPU, measured (training steps of the `tiny`-sized model, fp32 weights,
# bf16 autocast with attention kept in fp32, as the trainer runs it):
#   AMX (Intel Xeon, Sapphire Rapids and later): 165-205 ms a step against 220-250 ms in fp32, 1.2-1.5x
#       (benchmarks/train_shakespeare.md, "bf16 on AMX").
#   AVX512-BF16 without AMX (the project's AMD EPYC): the nanoGPT-CPU step 33.3 ms against 53.2 ms in fp32,
#       1.6x (benchmarks/RESULTS.md, section 4; 45.2 against 59.5 ms under the profiler).
#   neither: PyTorch emulates bf16 with fp32 instructions plus conversions, slower than fp32.
# The choice reads the CPU's instruction sets and never times anything, so the same command on the same
# machine always trains in the same precision (a timed test flipped with the machine's load).
CPU_BF16_SPEEDUP = {"AMX": "1.2-1.5x", "AVX512-BF16": "1.6x"}  # measured training steps, as above


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them in /proc/cpuinfo (amx_bf16, avx512_bf16, ...); empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def cpu_bf16_hardware() -> str | None:
    """"AMX" or "AVX512-BF16" when this CPU multiplies bf16 matrices in hardware, else None.

    PyTorch's own checks (which also ask the OS whether AMX may be used) where this PyTorch has them,
    else the flags in /proc/cpuinfo.
    """
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if amx() if amx else {"amx_bf16", "amx_tile"} <= cpu_flags():
        return "AMX"
    if avx512_bf16() if avx512_bf16 else "avx512_bf16" in cpu_flags():
        return "AVX512-BF16"
    return None


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """bf16 where the hardware has it (GPUs since Ampere; CPUs with AMX or AVX512-BF16), fp16 (with loss
    scaling) on older GPUs such as the T4, else fp32. Decided by the hardware alone: the same on every run."""
    if name == "auto":
        if device.type == "cuda":
            native = torch.cuda.is_bf16_supported(including_emulation=False)  # a T4 only emulates bf16
            return torch.bfloat16 if native else torch.float16
        if device.type == "cpu" and cpu_bf16_hardware() is not None:
            return torch.bfloat16  # 1.2-1.6x faster training steps (CPU_BF16_SPEEDUP)
        return torch.float32  # other CPUs emulate bf16 (slower than fp32); MPS: fp32 is safest
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def dtype_reason(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """Why `pick_dtype(name, device)` gave `dtype`, in a few words for the start of a run."""
    if name != "auto":
        return "as asked (--dtype)"
    if device.type == "cuda":
        return "this GPU has it natively" if dtype == torch.bfloat16 else "this GPU only emulates bf16; loss scaling on"
    if device.type == "cpu" and dtype == torch.bfloat16:
        units = cpu_bf16_hardware()
        return f"this CPU has {units}, where bf16 training steps measured {CPU_BF16_SPEEDUP[units]} faster than fp32"
    if device.type == "cpu":
        return "this CPU has no bf16 matrix instructions (AMX or AVX512-BF16), so fp32 is faster"
    return "the safe choice on this device"


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Let glibc keep freed memory for the next training step instead of handing it back to the OS.

    By default glibc serves each block over 128 KB (most activations) with a fresh mmap and unmaps it
    when freed, so every step touches brand-new pages: ~1,400 page faults per step of the default run.
    Keeping blocks up to 32 MB in the heap, and the heap from shrinking, made `python -m utils train`
    8-14% faster on the project's 2-core CPU (benchmarks/RESULTS.md). jemalloc and tcmalloc, which
    Intel's PyTorch CPU guide recommends, get the same effect. Linux with glibc only; True if applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl (Alpine) or another libc
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**30))
