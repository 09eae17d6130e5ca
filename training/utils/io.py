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


def _carry_run_artifacts(src: str, dst: str) -> None:
    for entry in os.listdir(src):
        source, target = os.path.join(src, entry), os.path.join(dst, entry)
        if os.path.exists(target):
            continue
        if os.path.isfile(source) and entry.endswith(RUN_ARTIFACT_SUFFIXES):
            os.link(source, target)
        elif os.path.isdir(source) and entry in RUN_ARTIFACT_DIRS:
            shutil.copytree(source, target, copy_function=os.link)
