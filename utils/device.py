"""Where and in what precision to run: cuda, then mps, then cpu; bf16 where the hardware has it."""

import os

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


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """bf16 where the hardware has it (GPUs since Ampere, CPUs with AMX), fp16 (with loss scaling) on
    older GPUs such as the T4, else fp32."""
    if name == "auto":
        if device.type == "cuda":
            native = torch.cuda.is_bf16_supported(including_emulation=False)  # a T4 only emulates bf16
            return torch.bfloat16 if native else torch.float16
        if device.type == "cpu" and cpu_has_bf16_matmul():
            return torch.bfloat16  # AMX: 1.2-1.5x faster training steps (benchmarks/train_shakespeare.md)
        return torch.float32  # other CPUs emulate bf16 (slower than fp32); MPS: fp32 is safest
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def dtype_reason(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """Why `pick_dtype(name, device)` gave `dtype`, in a few words for the start of a run."""
    if name != "auto":
        return "as asked (--dtype)"
    if device.type == "cuda":
        return "this GPU has it natively" if dtype == torch.bfloat16 else "this GPU only emulates bf16; loss scaling on"
    if device.type == "cpu":
        return "this CPU has AMX" if dtype == torch.bfloat16 else "this CPU has no AMX, so bf16 would be slower"
    return "the safe choice on this device"
