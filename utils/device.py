"""Where and in what precision to run: cuda, then mps, then cpu; bf16 where the hardware has it."""

import ctypes
import functools
import os
import sys
import time

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


def cpu_has_bf16_matmul() -> bool:
    """Does this CPU multiply bf16 matrices in hardware (Intel AMX, Sapphire Rapids and later)?"""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


@functools.lru_cache(maxsize=1)
def cpu_bf16_speedup() -> float:
    """How many times faster a bf16 matrix multiply runs than an fp32 one here, measured (~0.1 s, once).

    CPUs with AVX512-BF16 but no AMX (AMD Zen 4 and later, some Xeons) may or may not run PyTorch's
    bf16 kernels faster than fp32 ones; measuring beats guessing. Best of 5 of a training-sized matmul.
    """
    def best_ms(dtype):
        a, b = torch.randn(2048, 256, dtype=dtype), torch.randn(256, 512, dtype=dtype)
        times = []
        for _ in range(6):
            t = time.perf_counter()
            for _ in range(4):
                a @ b
            times.append(time.perf_counter() - t)
        return min(times[1:])  # the first call warms up
    return best_ms(torch.float32) / best_ms(torch.bfloat16)


def cpu_prefers_bf16() -> bool:
    """bf16 on this CPU: AMX, or AVX512-BF16 with bf16 matmuls measured at least 1.3x faster than fp32."""
    if cpu_has_bf16_matmul():
        return True
    has_avx512_bf16 = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
    return has_avx512_bf16 and cpu_bf16_speedup() >= 1.3


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """bf16 where the hardware has it (GPUs since Ampere; CPUs with AMX, or AVX512-BF16 measured faster),
    fp16 (with loss scaling) on older GPUs such as the T4, else fp32."""
    if name == "auto":
        if device.type == "cuda":
            native = torch.cuda.is_bf16_supported(including_emulation=False)  # a T4 only emulates bf16
            return torch.bfloat16 if native else torch.float16
        if device.type == "cpu" and cpu_prefers_bf16():
            return torch.bfloat16  # AMX: 1.2-1.5x faster training steps (benchmarks/train_shakespeare.md)
        return torch.float32  # other CPUs emulate bf16 (slower than fp32); MPS: fp32 is safest
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def dtype_reason(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """Why `pick_dtype(name, device)` gave `dtype`, in a few words for the start of a run."""
    if name != "auto":
        return "as asked (--dtype)"
    if device.type == "cuda":
        return "this GPU has it natively" if dtype == torch.bfloat16 else "this GPU only emulates bf16; loss scaling on"
    if device.type == "cpu" and dtype == torch.bfloat16:
        return ("this CPU has AMX" if cpu_has_bf16_matmul()
                else f"this CPU's AVX512-BF16 matmuls measured {cpu_bf16_speedup():.1f}x faster than fp32")
    if device.type == "cpu":
        return "this CPU has no bf16 matmul measured faster than fp32"
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
