"""Atomic directory writes: a crash, a kill or a full disk never leaves a half-written model or cache.

One directory (a model, a data cache) is written into a hidden temporary sibling, `.NAME.tmp-<token>`, and
renamed onto NAME. A set of directories that belong together (step 3's actor/, critic/ and actor_ema/) is
written into `.saving/` inside their parent and moved into place by `commit_set`, which first records the
set's members in `.saving/COMPLETE`: an interrupted move is finished (never undone) by `finish_interrupted_saves`,
so a reader finds the old set or the new set, never a mix. Whatever a killed save leaves behind is removed by
the next run into the same directory (`finish_interrupted_saves`, run under the output-directory lock).
"""
import contextlib
import json
import os
import re
import shutil
import uuid

from training.utils.errors import is_write_failure, write_failure

# Entries of an existing output directory that belong to the run, not to the model: they are carried
# into the new directory (hard links, so a `tee` still writing training.log keeps writing to it, and the
# output-directory lock file stays the locked file).
RUN_ARTIFACT_SUFFIXES = (".log", ".out", ".err")
RUN_ARTIFACT_DIRS = ("checkpoints", "tensorboard", "runs")
LOCK_FILE = ".lock"
SET_STAGING, SET_COMPLETE = ".saving", "COMPLETE"
_LEFTOVER = re.compile(r"^\..+\.(tmp|old)-[0-9a-f]{8}$")  # what atomic_directory names its temporary siblings


@contextlib.contextmanager
def atomic_directory(final_dir: str, what: str = "a directory"):
    """Yield a temporary sibling directory; on success it replaces `final_dir` in one rename.

    A symlink `final_dir` is resolved first, so the link keeps pointing at the new directory. On an exception the
    temporary directory is removed and `final_dir` is untouched; a failed write (disk full, ...) becomes one
    OutputWriteError line.
    """
    final_dir = os.path.realpath(final_dir)
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
    except BaseException as err:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if isinstance(err, Exception) and is_write_failure(err):
            keeps = "the earlier contents are intact" if os.path.isdir(final_dir) else "nothing was saved"
            raise write_failure(err, final_dir, what, keeps) from err
        raise


def is_run_artifact(path: str) -> bool:
    """A log, the lock file, a checkpoints/tensorboard directory, or a directory of TensorBoard event files only
    (--tensorboard_path pointing at the output directory, as DeepSpeed-Chat's scripts do)."""
    if not os.path.isdir(path):
        return path.endswith(RUN_ARTIFACT_SUFFIXES) or os.path.basename(path) == LOCK_FILE
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


# ---------------------------------------------------------------------------------------------- sets
def set_staging_dir(parent: str) -> str:
    """Where the next set of `parent` is written (one fixed name: the output-directory lock admits one run)."""
    return os.path.join(os.path.realpath(parent), SET_STAGING)


def start_set(parent: str) -> str:
    """An empty staging directory for a new set (an uncommitted one left by a killed save is dropped)."""
    staging = set_staging_dir(parent)
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    return staging


def commit_set(parent: str, members: tuple[str, ...]) -> None:
    """Make the staged set `parent`'s: every name in `members` is replaced by its staged copy, or removed when
    the new set has none (a run without EMA leaves no earlier actor_ema/ behind)."""
    staging = set_staging_dir(parent)
    new = sorted(m for m in os.listdir(staging) if m in members)
    _write_json_atomically(os.path.join(staging, SET_COMPLETE), {"members": new, "replaces": list(members)})
    _finish_set(os.path.realpath(parent))


def _finish_set(parent: str) -> None:
    """Move a committed set into place. Idempotent, so it can finish a move that a kill interrupted."""
    staging = os.path.join(parent, SET_STAGING)
    with open(os.path.join(staging, SET_COMPLETE), encoding="utf-8") as f:
        manifest = json.load(f)
    retired = os.path.join(parent, f"{SET_STAGING}.old")
    os.makedirs(retired, exist_ok=True)
    for name in manifest["replaces"]:
        current, staged = os.path.join(parent, name), os.path.join(staging, name)
        if name in manifest["members"] and not os.path.exists(staged):
            continue  # already moved in
        if os.path.lexists(current):
            shutil.rmtree(os.path.join(retired, name), ignore_errors=True)
            os.replace(current, os.path.join(retired, name))
        if name in manifest["members"]:
            os.replace(staged, current)
    shutil.rmtree(retired, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)


def _write_json_atomically(path: str, content: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(content, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def finish_interrupted_saves(output_dir: str) -> list[str]:
    """Clean up after saves that a kill interrupted in `output_dir` (and of `output_dir` itself, whose temporary
    siblings live in its parent): a committed set is moved into place, everything else half-written is removed.
    Returns what was done, for the log. Call only while holding the output-directory lock."""
    out = os.path.realpath(output_dir)
    parent, name = os.path.split(out)
    done = []
    if os.path.isfile(os.path.join(out, SET_STAGING, SET_COMPLETE)):
        _finish_set(out)
        done.append(f"finished moving the saved set {os.path.join(out, SET_STAGING)} into place")
    leftovers = [os.path.join(out, e) for e in _listdir(out) if e in (SET_STAGING, f"{SET_STAGING}.old")
                 or _LEFTOVER.match(e)]
    leftovers += [os.path.join(out, "checkpoints", e) for e in _listdir(os.path.join(out, "checkpoints"))
                  if e.startswith(".tmp-")]
    leftovers += [os.path.join(parent, e) for e in _listdir(parent)
                  if _LEFTOVER.match(e) and e.rsplit(".", 1)[0] == f".{name}"]
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
        done.append(f"removed {path} (left by an interrupted save)")
    return done


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []
