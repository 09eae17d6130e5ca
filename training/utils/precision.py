"""`--dtype auto`: the training precision chosen from the hardware at run time, and matmul throughput per dtype.

Rule (`resolve_dtype`):
  - an explicit "fp16", "bf16" or "fp32" is kept as requested;
  - "auto" (or no value) picks
      cuda: bf16 when the GPU computes bf16 natively (compute capability >= 8, or ROCm), else fp16
            (DeepSpeed-Chat's default);
      cpu:  bf16 when the CPU has native bf16 instructions (x86 AVX-512 BF16 or AMX-BF16, Arm BF16),
            else fp32;
      any other device: fp32.

Why the CPU flags and not torch's own check: `torch.ops.mkldnn._is_mkldnn_bf16_supported()` says True on
any AVX-512 CPU (it asks for AVX-512 BW/VL/DQ), where oneDNN emulates bf16 with fp32 arithmetic plus
conversions, which is slower than plain fp32. The kernel's flags (`avx512_bf16`, `amx_bf16`; Arm's `bf16`)
name the instructions that make bf16 faster. Where /proc/cpuinfo cannot be read (macOS, Windows) the
answer is "no", so auto falls back to fp32, the safe choice.
"""
import time

import torch

from training.utils.errors import UserInputError

DTYPES = ("fp16", "bf16", "fp32")
AUTO = "auto"
CPUINFO = "/proc/cpuinfo"
# /proc/cpuinfo flags that mean bf16 arithmetic in hardware: x86 (flags line) and aarch64 (Features line).
NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def read_cpu_flags(path: str = CPUINFO) -> frozenset[str]:
    """The CPU feature flags of the first processor in `path` (x86 "flags", Arm "Features"); empty if unreadable."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16(path: str = CPUINFO) -> bool:
    """Whether this CPU has bf16 instructions (AVX-512 BF16, AMX-BF16 or Arm BF16), from /proc/cpuinfo."""
    return bool(read_cpu_flags(path) & NATIVE_BF16_CPU_FLAGS)


def cpu_has_amx_bf16(path: str = CPUINFO) -> bool:
    """Whether this CPU has AMX-BF16 tile matmuls (Intel Xeon from Sapphire Rapids on), from /proc/cpuinfo."""
    return "amx_bf16" in read_cpu_flags(path)


def cuda_has_native_bf16() -> bool:
    """Whether the current CUDA (or ROCm) device computes bf16 natively; emulated bf16 does not count."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_dtype(requested: str | None, device_type: str) -> tuple[str, str]:
    """The training dtype ("bf16" | "fp16" | "fp32") for `--dtype requested` on `device_type`, and why.

    The reason is one line for the log. The hardware probes are the module functions
    `cpu_has_native_bf16` and `cuda_has_native_bf16`, looked up at call time (tests replace them).
    """
    if requested in DTYPES:
        return requested, "requested"
    if requested not in (None, AUTO):
        raise UserInputError(f"--dtype {requested} is not supported: use one of {', '.join(DTYPES + (AUTO,))}")
    if device_type == "cuda":
        if cuda_has_native_bf16():
            return "bf16", "auto: the GPU computes bf16 natively"
        return "fp16", "auto: the GPU has no native bf16 (compute capability < 8), so fp16"
    if device_type == "cpu":
        if cpu_has_native_bf16():
            return "bf16", "auto: the CPU has native bf16 (AVX-512 BF16 / AMX-BF16 / Arm BF16)"
        return "fp32", "auto: the CPU has no native bf16 instructions (bf16 would be emulated, slower than fp32)"
    return "fp32", f"auto: no bf16/fp16 rule for device '{device_type}', so fp32"


def matmul_gflops(m: int, k: int, n: int, dtype: str | torch.dtype = "fp32", seconds: float = 0.5,
                  device: str | torch.device = "cpu") -> float:
    """Best GFLOP/s of `[m, k] @ [k, n]` products (2*m*k*n FLOPs each) in `dtype`, timed for about `seconds`.

    Uses torch's current thread count. The best single product is reported, as a peak.
    """
    torch_dtype = TORCH_DTYPES[dtype] if isinstance(dtype, str) else dtype
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(m, k, generator=generator).to(device=device, dtype=torch_dtype)
    b = torch.randn(k, n, generator=generator).to(device=device, dtype=torch_dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    torch.matmul(a, b)  # warm-up: thread pool, allocator, kernel choice
    sync()
    best = float("inf")
    deadline = time.perf_counter() + seconds
    runs = 0
    while runs < 3 or time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.matmul(a, b)
        sync()
        best = min(best, time.perf_counter() - start)
        runs += 1
    return round(2 * m * k * n / best / 1e9, 1)


def matmul_peak_gflops(dtype: str | torch.dtype = "fp32", size: int = 1024, seconds: float = 0.5,
                       device: str | torch.device = "cpu") -> float:
    """Best GFLOP/s of `size x size` square products in `dtype` (the peak an MFU is measured against)."""
    return matmul_gflops(size, size, size, dtype=dtype, seconds=seconds, device=device)
