"""`--dtype auto`: the dtype picked per device and hardware, the CPU bf16 probe, and the matmul rate helper."""
import pytest
import torch

from training.utils import precision
from training.utils.errors import UserInputError
from training.utils.precision import (
    cpu_has_native_bf16,
    matmul_gflops,
    matmul_peak_gflops,
    read_cpu_flags,
    resolve_dtype,
)

# Trimmed /proc/cpuinfo texts of real CPU generations.
SKYLAKE_X = ("processor\t: 0\nmodel name\t: Intel Xeon Gold 6148\n"
             "flags\t\t: fpu sse2 avx2 avx512f avx512dq avx512bw avx512vl avx512_vnni\n")
COOPER_LAKE = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw avx512vl avx512_vnni avx512_bf16\n"
SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: fpu avx512f avx512_vnni amx_bf16 amx_tile amx_int8\n"
ZEN4 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
GRAVITON3 = "processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd sve i8mm bf16 svebf16\n"
GRAVITON2 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp\n"
AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"


@pytest.mark.parametrize("cpuinfo, native", [(SKYLAKE_X, False), (COOPER_LAKE, True), (SAPPHIRE_RAPIDS, True),
                                             (ZEN4, True), (GRAVITON3, True), (GRAVITON2, False),
                                             (AVX2_ONLY, False)])
def test_cpu_bf16_probe_reads_cpuinfo_flags(tmp_path, cpuinfo, native):
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo + "\nprocessor\t: 1\nflags\t\t: fpu\n", encoding="utf-8")
    assert cpu_has_native_bf16(str(path)) is native


def test_cpu_bf16_probe_without_cpuinfo_says_no(tmp_path):
    assert read_cpu_flags(str(tmp_path / "missing")) == frozenset()
    assert cpu_has_native_bf16(str(tmp_path / "missing")) is False


def test_cpu_bf16_probe_on_this_machine_agrees_with_its_flags():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read().split()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    expected = any(flag in flags for flag in ("avx512_bf16", "amx_bf16", "bf16"))
    assert cpu_has_native_bf16() is expected


@pytest.mark.parametrize("requested", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("device_type", ["cuda", "cpu", "xpu"])
@pytest.mark.parametrize("native", [True, False])
def test_explicit_dtype_is_kept(monkeypatch, requested, device_type, native):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(precision, "cuda_has_native_bf16", lambda: native)
    assert resolve_dtype(requested, device_type) == (requested, "requested")


@pytest.mark.parametrize("requested", ["auto", None])
@pytest.mark.parametrize("device_type, cpu_bf16, cuda_bf16, expected", [
    ("cpu", True, False, "bf16"),
    ("cpu", False, True, "fp32"),
    ("cuda", False, True, "bf16"),
    ("cuda", True, False, "fp16"),
    ("xpu", True, True, "fp32"),
    ("mps", True, True, "fp32"),
])
def test_auto_follows_the_hardware(monkeypatch, requested, device_type, cpu_bf16, cuda_bf16, expected):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: cpu_bf16)
    monkeypatch.setattr(precision, "cuda_has_native_bf16", lambda: cuda_bf16)
    dtype, reason = resolve_dtype(requested, device_type)
    assert dtype == expected
    assert reason.startswith("auto") and "\n" not in reason


def test_auto_on_this_cpu_matches_its_flags():
    assert resolve_dtype("auto", "cpu")[0] == ("bf16" if cpu_has_native_bf16() else "fp32")


def test_cuda_probe_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert precision.cuda_has_native_bf16() is False
    assert resolve_dtype("auto", "cuda")[0] == "fp16"


def test_cuda_probe_does_not_count_emulated_bf16(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **kw: calls.append(kw) or False)
    assert precision.cuda_has_native_bf16() is False and calls == [{"including_emulation": False}]


def test_unknown_dtype_is_a_user_error():
    with pytest.raises(UserInputError, match="--dtype float8"):
        resolve_dtype("float8", "cpu")


@pytest.mark.parametrize("dtype", ["fp32", "bf16", torch.float32])
def test_matmul_rates_are_positive(dtype):
    assert matmul_peak_gflops(dtype, size=64, seconds=0.01) > 0
    assert matmul_gflops(16, 32, 64, dtype, seconds=0.01) > 0
