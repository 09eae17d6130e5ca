"""Model construction (hub name, local directory or tiny in-repo config) and Hugging Face save/load."""


def round_up(value: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is at least `value` (sizes rounded so kernels and buffers repeat)."""
    return -(-value // multiple) * multiple
