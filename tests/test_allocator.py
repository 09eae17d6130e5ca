"""training/utils/allocator.py: with the heap kept, freed large tensors' memory is reused without page faults."""
import subprocess
import sys

import pytest

from training.utils.allocator import keep_freed_memory
from training.utils.errors import UserInputError

# In a fresh process: six "steps" that each allocate, touch and free a step's worth of large tensors (112 MiB,
# 28,672 pages); the minor page faults of steps 2-6 (the first one maps the memory in any case).
PROBE = """
import resource, torch
from training.utils.allocator import keep_freed_memory
kept = keep_freed_memory()
torch.ones(16 * 2**20), torch.ones(4 * 2**20), torch.ones(8 * 2**20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for step in range(5):
    tensors = [torch.ones(n * 2**20) for n in (16, 4, 8)]
    del tensors
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(setting: str) -> tuple[str, int]:
    env = {"RLHF_KEEP_FREED_MEMORY": setting, "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    kept, faults = out.stdout.split()
    return kept, int(faults)


def test_kept_heap_reuses_freed_memory_with_far_fewer_page_faults():
    kept, faults = page_faults("1")
    if kept != "True":
        pytest.skip("not glibc: mallopt is not there")
    default = page_faults("off")
    assert default == ("False", pytest.approx(5 * 28672, rel=0.2))  # glibc's default: every page, every step
    assert faults < default[1] / 2  # the heap hands most of it back already mapped (0 per step once it settles)


@pytest.mark.parametrize("value", ["2", "maybe", "-1"])
def test_a_nonsense_setting_is_one_clear_error(monkeypatch, value):
    monkeypatch.setenv("RLHF_KEEP_FREED_MEMORY", value)
    with pytest.raises(UserInputError, match=f"RLHF_KEEP_FREED_MEMORY='{value}': use 1 .* or 0"):
        keep_freed_memory()
