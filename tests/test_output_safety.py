"""The pieces that keep outputs whole (issue 16's data-loss class), tested directly and fast.

- The output-directory lock: a second holder is refused naming the first; a killed holder frees it; a refused
  run leaves no directory behind.
- Step 3's set of models (actor/, critic/, actor_ema/): a kill while the set is written leaves the old set; a
  kill while it is moved into place is finished by the next run, so a reader never sees a mix; a new set
  without actor_ema/ removes the old one.
- Leftovers of killed saves are removed by the next run into the directory.
- Disk full: the real errors torch.save, safetensors and plain writes raise under a file-size limit (the way
  a full disk is simulated here: RLIMIT_FSIZE; Python ignores SIGXFSZ, so writes fail with EFBIG) are
  recognised, the partial copy is removed and the earlier contents stay.
- A symlinked output directory is written through the link.
- stdout closed early (`| head`) does not crash an entry point.
"""
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import REPO, clean_env

from training.utils.atomic_dir import (
    SET_COMPLETE,
    atomic_directory,
    commit_set,
    finish_interrupted_saves,
    set_staging_dir,
    start_set,
)
from training.utils.errors import OutputWriteError, UserInputError, is_write_failure
from training.utils.output_dir import OutputDirLock, check_writable

MEMBERS = ("actor", "critic", "actor_ema")


# ---------------------------------------------------------------------------------------------- the lock
def test_a_second_run_is_refused_naming_the_holder_until_the_first_releases(tmp_path):
    first, second = OutputDirLock(str(tmp_path / "out")), OutputDirLock(str(tmp_path / "out"))
    first.acquire()
    with pytest.raises(UserInputError, match=rf"is in use by another run \(pid {os.getpid()} on "):
        second.acquire()
    first.release()
    assert not (tmp_path / "out").exists()  # made by this run, left empty: removed again
    second.acquire()
    assert json.loads((tmp_path / "out" / ".lock").read_text())["pid"] == os.getpid()
    second.release()


def test_a_killed_holder_frees_the_lock(tmp_path):
    out = tmp_path / "out"
    holder = textwrap.dedent(f"""
        import os, signal
        from training.utils.output_dir import OutputDirLock
        OutputDirLock({str(out)!r}).acquire()
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    result = subprocess.run([sys.executable, "-c", holder], env=clean_env(), cwd=REPO, capture_output=True)
    assert result.returncode == -signal.SIGKILL
    assert (out / ".lock").exists()  # the stale file stays, but it holds no lock
    lock = OutputDirLock(str(out))
    lock.acquire()
    lock.release()


def test_unwritable_paths_are_refused_in_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for path, reason in [(tmp_path / "file" / "sub", "Not a directory"), (tmp_path / "loop" / "x", "Too many levels"),
                         ("/proc/no-such-dir/out", "No such file or directory")]:
        with pytest.raises(UserInputError, match=rf"--tensorboard_path '{path}' cannot be created \({reason}"):
            check_writable(str(path), "--tensorboard_path")
    check_writable(str(tmp_path / "new" / "deeper"), "--tensorboard_path")
    assert not (tmp_path / "new").exists()  # the check leaves nothing behind


# ---------------------------------------------------------------------------------------------- sets
def write_set(parent, tag: str, members=MEMBERS) -> None:
    staging = start_set(str(parent))
    for name in members:
        os.makedirs(os.path.join(staging, name))
        with open(os.path.join(staging, name, "tag"), "w") as f:
            f.write(tag)


def tags(parent) -> dict[str, str]:
    return {name: (parent / name / "tag").read_text() for name in MEMBERS if (parent / name).exists()}


def test_a_committed_set_replaces_the_old_one_and_drops_members_it_lacks(tmp_path):
    write_set(tmp_path, "old")
    commit_set(str(tmp_path), MEMBERS)
    assert tags(tmp_path) == {"actor": "old", "critic": "old", "actor_ema": "old"}
    write_set(tmp_path, "new", members=("actor", "critic"))  # a rerun without --enable_ema
    commit_set(str(tmp_path), MEMBERS)
    assert tags(tmp_path) == {"actor": "new", "critic": "new"}
    assert sorted(os.listdir(tmp_path)) == ["actor", "critic"]


def test_a_kill_while_the_set_is_written_leaves_the_old_set(tmp_path):
    write_set(tmp_path, "old")
    commit_set(str(tmp_path), MEMBERS)
    write_set(tmp_path, "new", members=("actor",))  # killed after the actor, before the critic: no COMPLETE
    assert tags(tmp_path) == {"actor": "old", "critic": "old", "actor_ema": "old"}
    done = finish_interrupted_saves(str(tmp_path))
    assert tags(tmp_path) == {"actor": "old", "critic": "old", "actor_ema": "old"}
    assert sorted(os.listdir(tmp_path)) == list(sorted(MEMBERS)) and "removed" in done[0]


@pytest.mark.parametrize("moved", [0, 1, 2])
def test_a_kill_while_the_set_is_moved_in_is_finished_by_the_next_run(tmp_path, moved):
    """Replay commit_set's moves up to a kill after `moved` members, then let the next run finish."""
    write_set(tmp_path, "old")
    commit_set(str(tmp_path), MEMBERS)
    write_set(tmp_path, "new", members=("actor", "critic"))
    staging = set_staging_dir(str(tmp_path))
    with open(os.path.join(staging, SET_COMPLETE), "w") as f:
        json.dump({"members": ["actor", "critic"], "replaces": list(MEMBERS)}, f)
    retired = tmp_path / ".saving.old"
    retired.mkdir()
    for name in ["actor", "critic"][:moved]:
        os.replace(tmp_path / name, retired / name)
        os.replace(os.path.join(staging, name), tmp_path / name)
    finish_interrupted_saves(str(tmp_path))
    assert tags(tmp_path) == {"actor": "new", "critic": "new"}
    assert sorted(os.listdir(tmp_path)) == ["actor", "critic"]


def test_leftovers_of_killed_saves_are_removed_and_nothing_else(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoints" / ".tmp-step_00000004").mkdir(parents=True)
    (out / "checkpoints" / "step_00000002").mkdir()
    (out / ".actor.tmp-0123abcd").mkdir()
    (tmp_path / ".out.tmp-89abcdef").mkdir()  # a killed final save of steps 1/2 (a sibling of out)
    (tmp_path / ".other.tmp-89abcdef").mkdir()  # another directory's: not ours to remove
    (out / "training.log").write_text("kept")
    done = finish_interrupted_saves(str(out))
    assert len(done) == 3
    assert sorted(os.listdir(tmp_path)) == [".other.tmp-89abcdef", "out"]
    assert sorted(os.listdir(out)) == ["checkpoints", "training.log"]
    assert os.listdir(out / "checkpoints") == ["step_00000002"]


# ---------------------------------------------------------------------------------------------- full disks
@pytest.fixture
def file_size_limit():
    """Writes beyond 64 KiB fail as on a full disk (restored afterwards)."""
    previous = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, previous[1]))
    yield
    resource.setrlimit(resource.RLIMIT_FSIZE, previous)


def test_the_write_failures_of_torch_safetensors_and_files_are_recognised(tmp_path, file_size_limit):
    from safetensors.torch import save_file

    big = torch.zeros(100_000)
    writers = [lambda: torch.save({"x": big}, tmp_path / "a.pt"),
               lambda: save_file({"x": big}, str(tmp_path / "a.safetensors")),
               lambda: (tmp_path / "a.txt").write_bytes(b"x" * 200_000)]
    for write in writers:
        with pytest.raises(Exception) as raised:
            write()
        assert is_write_failure(raised.value), raised.value
    assert not is_write_failure(RuntimeError("a bug")) and not is_write_failure(KeyError("x"))


def test_a_full_disk_removes_the_partial_copy_and_keeps_the_earlier_directory(tmp_path, file_size_limit):
    model = tmp_path / "model"
    with atomic_directory(str(model)) as tmp:
        (tmp_path / tmp / "weights").write_bytes(b"old")
    with pytest.raises(OutputWriteError, match=r"could not write the model to '.*model' \(the disk refused the "
                                               r"write: .*\): the partial copy was removed and the earlier contents "
                                               r"are intact"):
        with atomic_directory(str(model), what="the model") as tmp:
            torch.save({"x": torch.zeros(100_000)}, os.path.join(tmp, "weights"))
    assert sorted(os.listdir(tmp_path)) == ["model"] and (model / "weights").read_bytes() == b"old"


# ---------------------------------------------------------------------------------------------- links, pipes
def test_a_symlinked_directory_is_replaced_through_the_link(tmp_path):
    target, link = tmp_path / "disk" / "model", tmp_path / "model"
    target.mkdir(parents=True)
    link.symlink_to(target)
    with atomic_directory(str(link)) as tmp:
        (tmp_path / tmp / "weights").write_text("new")
    assert link.is_symlink() and (target / "weights").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["disk", "model"]


def test_an_entry_point_survives_a_reader_that_stops_reading():
    program = textwrap.dedent("""
        from training.utils.errors import report_user_errors
        @report_user_errors
        def main():
            for i in range(100_000):
                print(f"line {i}")
            print("done")
        main()
    """)
    result = subprocess.run(f"{sys.executable} -c '{program}' | head -1", shell=True, cwd=REPO, env=clean_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.stdout == "line 0\n" and result.stderr == ""
