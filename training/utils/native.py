"""The package's C++ kernels (training/utils/csrc/*.cpp), built on the machine that runs them.

torch.utils.cpp_extension compiles a kernel on its first use (g++ and ninja, which DeepSpeed's CPU ops need as
well: ~25 s once) and caches it under TORCH_EXTENSIONS_DIR (by default ~/.cache/torch_extensions); a cached load
takes ~0.1 s. No binary is shipped. The kernels are written for AVX-512 (the flags below) and used only on CPUs
that report those flags; where a build fails, the caller keeps torch's own path, after one warning line.
"""
import os
import warnings

from training.utils import precision
from training.utils.distributed import print_rank_0
from training.utils.errors import describe_error

SOURCES = os.path.join(os.path.dirname(__file__), "csrc")
AVX512_CPU_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq"})  # what COMPILE_FLAGS let it use
# ATen's vectorized functions in their AVX-512 form; no contraction of a product and a sum into an FMA beyond the
# ones a kernel writes out (the optimizer kernel matches torch's rounding step by step)
COMPILE_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-ffp-contract=off",
                 "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"]


def cpu_runs_avx512() -> bool:
    """Whether this CPU has every instruction set the kernels are compiled for."""
    return AVX512_CPU_FLAGS <= precision.read_cpu_flags()


def build(name: str, what: str, fallback: str, switch: str, extra_flags: tuple[str, ...] = ()):
    """The compiled module of csrc/`name`.cpp, or None with one warning line where it cannot be built or loaded
    (no compiler, no ninja, a read-only cache directory). `what` names the kernel in the messages, `fallback`
    says what runs instead, `switch` is the ENV_SWITCHES entry that turns it off; `extra_flags` are compiler flags
    beyond COMPILE_FLAGS (instruction sets only some of the CPUs with AVX-512 have)."""
    from torch.utils import cpp_extension

    extension = f"rlhf_{name}"
    try:
        build_dir = cpp_extension._get_build_directory(extension, verbose=False)
        if not any(entry.endswith(".so") for entry in os.listdir(build_dir)):
            print_rank_0(f"building {what} (once on this machine, ~25 s; kept in {build_dir})")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (compiler-version notices; a failure is reported below)
            return cpp_extension.load(name=extension, sources=[os.path.join(SOURCES, f"{name}.cpp")],
                                      extra_cflags=COMPILE_FLAGS + list(extra_flags), verbose=False)
    except Exception as err:
        print(f"warning: {what} could not be built ({describe_error(err)}); {fallback} (set {switch}=0 to skip "
              "the build)", flush=True)
        return None
