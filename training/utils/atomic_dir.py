"""Atomic directory writes: a crash or kill never leaves a half-written model or cache."""
import contextlib
import os
import shutil
import uuid

# Entries of an existing output directory that belong to the run, not to the model: they are carried
# into the new directory (hard links, so a `tee` still writing training.log keeps writing to it).
RUN_ARTIFACT_SUFFIXES = (".log", ".out", ".err")
RUN_ARTIFACT_DIRS = ("checkpoints", "tensorboard", "runs")


@contextlib.contextmanager
def atomic_directory(final_dir: str):
    """Yield a temporary sibling directory; on success it replaces `final_dir` in one rename.

    On an exception the temporary directory is removed and `final_dir` is untouched.
    """
    final_dir = os.path.abspath(final_dir)
    parent, name = os.path.split(final_dir)
    os.makedirs(parent, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    tmp_dir = os.path.join(parent, f".{name}.tmp-{token}")
    os.makedirs(tmp_dir)
    try:
        yield tmp_dir
        old_dir = None
        if os.path.isdir(final_dir):
            _carry_run_artifacts(final_dir, tmp_dir)
            old_dir = os.path.join(parent, f".{name}.old-{token}")
            os.replace(final_dir, old_dir)
        os.replace(tmp_dir, final_dir)
        if old_dir is not None:
            shutil.rmtree(old_dir, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def is_run_artifact(path: str) -> bool:
    """A log, a checkpoints/tensorboard directory, or a directory of TensorBoard event files only
    (--tensorboard_path pointing at the output directory, as DeepSpeed-Chat's scripts do)."""
    if not os.path.isdir(path):
        return path.endswith(RUN_ARTIFACT_SUFFIXES)
    return os.path.basename(path) in RUN_ARTIFACT_DIRS or all(
        name.startswith("events.out.tfevents") for _, _, files in os.walk(path) for name in files)


def _carry_run_artifacts(src: str, dst: str) -> None:
    for entry in os.listdir(src):
        source, target = os.path.join(src, entry), os.path.join(dst, entry)
        if os.path.exists(target) or not is_run_artifact(source):
            continue
        if os.path.isfile(source):
            os.link(source, target)
        else:
            shutil.copytree(source, target, copy_function=os.link)
