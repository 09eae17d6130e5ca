"""Resumable checkpoints, shared by every step: periodic saves, --resume, a stop on a non-finite loss,
and a checkpoint on SIGTERM/SIGINT.

A checkpoint is `<output_dir>/checkpoints/step_00000042/`:

    <engine name>/            DeepSpeed's own checkpoint of each trained engine (module, optimizer, LR
                              scheduler, its step counters), one shard per rank under ZeRO
    rank_<r>.pt               that rank's RNG states (python, numpy, torch, cuda) and per-rank extras
    <name>_rank_<r>.safetensors  weights of frozen-but-changing models (step 3's EMA), this rank's share
    trainer_state.json        position (epoch, batches of the epoch done, optimizer step), the metrics
                              history, the flags that must match to resume, step-specific state

It is written into `.tmp-step_...` by all ranks and renamed by rank 0 only after every rank finished,
so a kill at any moment leaves the previous checkpoints untouched; leftovers of a killed save are
removed by the next one. Checkpoints are saved at optimizer-step boundaries only (no half-accumulated
gradients), so resuming replays exactly: the same batches in the same order with the same random draws.
"""
import contextlib
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import signal
from dataclasses import asdict, dataclass

import numpy as np
import torch

from training.utils import distributed
from training.utils.config import at_least, fixed_flag_values, option
from training.utils.errors import (
    NonFiniteLossError,
    OutputWriteError,
    UserInputError,
    is_write_failure,
    say,
    write_failure,
)
from training.utils.loop import Position
from training.utils.output_dir import refuse_if_in_use
from training.utils.seeding import get_rng_state, set_rng_state

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TRAINER_STATE = "trainer_state.json"
_STEP_NAMES = {"SFTConfig": "step 1 (SFT)", "RewardConfig": "step 2 (reward model)", "DPOConfig": "DPO",
               "RLHFConfig": "step 3 (RLHF)"}  # configuration class -> the step a person knows

@dataclass
class CheckpointFlags:
    """checkpoints [new]"""
    save_interval: int = option(0, "Save a resumable checkpoint every N steps (optimizer steps; step 3: PPO steps) "
                                   "into <output_dir>/checkpoints (0: only when stopped by SIGTERM/SIGINT).",
                                check=at_least(0))
    save_total_limit: int = option(2, "Keep the newest N checkpoints; older ones are deleted once a newer one is "
                                      "complete (0: keep all).", check=at_least(0))
    resume: str | None = option(None, "Continue an interrupted run: alone, from the newest checkpoint in "
                                      "<output_dir>/checkpoints; with PATH, from that checkpoint (a step_N directory "
                                      "or a checkpoints directory). Flags marked fixed on resume must be unchanged "
                                      "(refused otherwise); the others, learning rates and weight decay included, "
                                      "take effect from the resume on.", nargs="?", const="latest", metavar="PATH")
    keep_checkpoints: bool = option(False, "Keep the checkpoints after the run finishes (default: deleted once the "
                                           "final model is saved).")

    def validate_checkpoints(self, output_dir: str) -> None:
        """Checks that need no process group: run before anything is written."""
        refuse_if_in_use(output_dir)  # first: another run's checkpoints are not this run's to judge
        root = os.path.join(output_dir, CHECKPOINTS)
        found = list_checkpoints(root)
        if self.resume is None and found:
            raise UserInputError(f"--output_dir {output_dir} holds checkpoints of an earlier run "
                                 f"({os.path.basename(found[-1])}): add --resume to continue it, or "
                                 "choose another --output_dir")
        if self.resume is not None:  # fail now, not after the models are built
            path = find_checkpoint(self.resume, root)
            state = read_trainer_state(path)
            written_by = state["run"].get("program")
            if written_by not in (None, type(self).__name__):
                raise UserInputError(f"--resume: {path} is a checkpoint of {_STEP_NAMES.get(written_by, written_by)}, "
                                     f"not of {_STEP_NAMES.get(type(self).__name__, 'this step')}: pass a checkpoint "
                                     "this step wrote")


def list_checkpoints(root: str) -> list[str]:
    """Complete checkpoints under `root`, oldest first (a killed save leaves only a .tmp- directory)."""
    if not os.path.isdir(root):
        return []
    steps = sorted((int(m.group(1)), name) for name in os.listdir(root) if (m := _STEP_DIR.match(name)))
    return [os.path.join(root, name) for _, name in steps]


def training_data_fingerprint(data) -> str:
    """A digest of the training split's token ids: a resume must continue on exactly the data it started on (the
    same path with other contents is other data; a new version of this tool that tokenises alike is not)."""
    digest = hashlib.sha256()
    for name, (values, offsets) in sorted(data.train.fields.items()):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(values).tobytes())
        digest.update(np.ascontiguousarray(offsets).tobytes())
    return digest.hexdigest()[:20]


def read_trainer_state(path: str) -> dict:
    """A checkpoint's trainer_state.json, after checking that every file the resume will read is there."""
    try:
        with open(os.path.join(path, _TRAINER_STATE), encoding="utf-8") as f:
            state = json.load(f)
        world, engines = state["run"]["world_size"], state["run"].get("engines", [])
        absent = {"position", "metrics_history", "step_state"} - state.keys()
        if absent:
            raise KeyError(", ".join(sorted(absent)))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise damaged_checkpoint(path, f"{_TRAINER_STATE}: {type(err).__name__}: {err}") from None
    missing = [f"rank_{r}.pt" for r in range(world) if not os.path.isfile(os.path.join(path, f"rank_{r}.pt"))]
    missing += [f"{name}/" for name in engines if not os.path.isdir(os.path.join(path, name))]
    if missing:
        raise damaged_checkpoint(path, f"missing {', '.join(missing)}")
    return state


def damaged_checkpoint(path: str, reason: str) -> UserInputError:
    earlier = [c for c in list_checkpoints(os.path.dirname(os.path.abspath(path))) if c < os.path.abspath(path)]
    fix = f"resume from the earlier checkpoint with --resume {earlier[-1]}" if earlier else "start without --resume"
    return UserInputError(f"--resume: checkpoint {path} is damaged or incomplete ({reason}): {fix}, or delete it")


def find_checkpoint(resume: str, default_root: str) -> str:
    """The checkpoint directory --resume names: the newest one of `default_root` ("latest"), of a given
    checkpoints directory, or the given step directory itself."""
    if resume != "latest" and os.path.isfile(os.path.join(resume, _TRAINER_STATE)):
        return resume
    root = default_root if resume == "latest" else resume
    found = list_checkpoints(root)
    if not found:
        raise UserInputError(f"--resume: no checkpoint in {root} (checkpoints are written with --save_interval N "
                             "or when a run is stopped with SIGTERM/SIGINT); drop --resume to start from scratch")
    return found[-1]


class Checkpointer:
    """One step's checkpoints: `engines` are the trained DeepSpeed engines by name."""

    def __init__(self, config, engines: dict, device, data=None):
        """`config`: the step's configuration (output_dir, the CheckpointFlags, the FIXED flags to match);
        `data`: the training data (a pipeline.PhaseData), whose tokens must be the same on resume."""
        self.config, self.engines, self.device = config, engines, device
        self.data_key = training_data_fingerprint(data) if data is not None else None
        self.root = os.path.join(config.output_dir, CHECKPOINTS)
        self.stop_signal: int | None = None
        self.resumed_from: str | None = None  # the checkpoint directory --resume loaded

    # ------------------------------------------------------------------ resume
    def resume(self, metrics, loaders=(), rank_state_consumers=()) -> tuple[Position, dict]:
        """With --resume: load every engine, the metrics history and RNG states; return the position and the
        step's own saved state (`{}` and the start position without --resume).

        `loaders` are DataLoaders of ours (ResumableSampler) that will skip the batches already trained in
        the resumed epoch. Call right before the training loop: the RNG states are restored last.
        """
        if self.config.resume is None:
            return Position(), {}
        path = self.resumed_from = find_checkpoint(self.config.resume, self.root)
        state = read_trainer_state(path)
        self._check_compatible(path, state)
        for name, engine in self.engines.items():
            configured = optimizer_settings(engine)
            try:
                with weights_only_loads():
                    load_path, _ = engine.load_checkpoint(path, tag=name, load_optimizer_states=True,
                                                          load_lr_scheduler_states=True)
            except pickle.UnpicklingError as err:
                reason = str(err).split("WeightsUnpickler error: ")[-1].split(". ")[0]
                raise UserInputError(f"--resume: {path}/{name} holds a pickled object that is not weights ({reason}): "
                                     "resume only from checkpoints this tool wrote") from None
            except (OSError, RuntimeError, KeyError, ValueError, EOFError) as err:  # truncated or missing shards
                reason = f"{name}: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
                raise damaged_checkpoint(path, reason) from None
            if load_path is None:
                raise damaged_checkpoint(path, f"DeepSpeed could not load {name}/")
            self._apply_optimizer_settings(name, engine, configured)
        metrics.history = state["metrics_history"]
        position = Position(**state["position"])
        for loader in loaders:
            loader.sampler.skip_batches(position.batches_done, loader.batch_size)
        try:
            rank_state = torch.load(os.path.join(path, f"rank_{distributed.rank()}.pt"), weights_only=True)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
            raise damaged_checkpoint(path, f"rank_{distributed.rank()}.pt: {str(err).splitlines()[0][:160]}") from None
        for consume in rank_state_consumers:
            consume(rank_state)
        set_rng_state(rank_state["rng"])
        distributed.print_rank_0(f"resumed from {path}: epoch {position.epoch + 1}, {position.batches_done} batches "
                                 f"of it done, step {position.global_step}")
        return position, state["step_state"]

    def _apply_optimizer_settings(self, name: str, engine, configured: list[tuple[float, float]]) -> None:
        """Learning rates and weight decay may change on resume (FREE flags): the checkpoint restored its own into
        the optimizer and the schedule, so put this run's values back, keeping the schedule's position (a
        learning rate halved on resume is half of what the schedule would have given, from this step on)."""
        if engine.lr_scheduler is None:
            return
        scheduler, changed = engine.lr_scheduler, []
        for i, (group, (base_lr, weight_decay)) in enumerate(zip(scheduler.optimizer.param_groups, configured)):
            restored = scheduler.base_lrs[i]
            if restored != base_lr:
                changed.append(f"learning rate {restored:g} -> {base_lr:g}")
                group["lr"] = group["lr"] * base_lr / restored if restored else base_lr
                scheduler.base_lrs[i] = group["initial_lr"] = base_lr
            if group.get("weight_decay") != weight_decay:
                changed.append(f"weight decay {group.get('weight_decay'):g} -> {weight_decay:g}")
                group["weight_decay"] = weight_decay
        scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
        if changed:
            distributed.print_rank_0(f"--resume: {name}: applied this run's {'; '.join(sorted(set(changed)))}")

    def _check_compatible(self, path: str, state: dict) -> None:
        """Refuse, before any training, a checkpoint this run cannot continue exactly."""
        saved = state["run"]
        if self.data_key and saved.get("data") not in (None, self.data_key):
            raise UserInputError(f"--resume: the training data differ from those {path} was trained on (the contents "
                                 "of a --data_path or the tokenizer changed since, so the training tokens differ): "
                                 "resume with the data the run started with, or start a new --output_dir")
        if saved["world_size"] != distributed.world_size():
            raise UserInputError(f"--resume: {path} was written by {saved['world_size']} ranks, this run has "
                                 f"{distributed.world_size()}: resume with the same number of ranks (ZeRO shards and "
                                 "the data order depend on it)")
        current = fixed_flag_values(self.config)
        changed = [f"--{k} {saved['flags'][k]!r} -> {current[k]!r}" for k in sorted(current)
                   if k in saved["flags"] and saved["flags"][k] != current[k]]
        if changed:
            raise UserInputError(f"--resume: {path} was written with other values of flags that fix the data order, "
                                 f"schedule or saved state ({'; '.join(changed)}): resume with the original values, "
                                 "or start a new --output_dir")

    # ------------------------------------------------------------------ save
    def due(self, global_step: int) -> bool:
        return bool(self.config.save_interval) and global_step % self.config.save_interval == 0

    def save(self, position: Position, metrics, step_state: dict | None = None, rank_state: dict | None = None,
             weights: dict | None = None) -> str:
        """Write a checkpoint atomically; every rank must call it.

        `step_state`: JSON-able state of the step (rank 0's is saved); `rank_state`: tensors/lists of this rank;
        `weights`: {name: {tensor name: tensor}} of this rank, saved as safetensors (see load_weights).
        """
        final = os.path.join(self.root, f"step_{position.global_step:08d}")
        tmp = os.path.join(self.root, f".tmp-step_{position.global_step:08d}")
        if distributed.is_rank_0():
            os.makedirs(self.root, exist_ok=True)
            for leftover in os.listdir(self.root):  # killed saves, and this step's if it was saved before
                if leftover.startswith(".tmp-"):
                    shutil.rmtree(os.path.join(self.root, leftover), ignore_errors=True)
            os.makedirs(tmp)
        distributed.barrier()
        failure = None
        try:
            self._write(tmp, position, metrics, step_state, rank_state, weights)
        except Exception as err:  # every rank must learn of it, or the others would wait at the barrier forever
            failure = err
        disk_failure = failure is not None and is_write_failure(failure)
        failed_ranks, disk_failures = distributed.all_reduce_sum([float(failure is not None), float(disk_failure)],
                                                                 self.device)
        if failed_ranks:
            if distributed.is_rank_0():
                shutil.rmtree(tmp, ignore_errors=True)
            latest = self.latest()
            keeps = f"the last complete checkpoint is {latest}" if latest else "no checkpoint was saved"
            if disk_failure:
                raise write_failure(failure, final, "a checkpoint", keeps) from failure
            if failure is not None:
                raise failure
            error = OutputWriteError if disk_failures else RuntimeError  # (a crash elsewhere is no bad input)
            raise error(f"could not write checkpoint {final} on another rank: the partial copy was removed and "
                        f"{keeps}; see that rank's error")
        distributed.barrier()  # every rank's files are complete before the checkpoint becomes visible
        if distributed.is_rank_0():
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            if self.config.save_total_limit:
                for old in list_checkpoints(self.root)[:-self.config.save_total_limit]:
                    shutil.rmtree(old, ignore_errors=True)
        distributed.barrier()
        distributed.print_rank_0(f"saved checkpoint {final}")
        return final

    def _write(self, tmp: str, position: Position, metrics, step_state, rank_state, weights) -> None:
        """This rank's files of a checkpoint (rank 0 adds trainer_state.json)."""
        for name, engine in self.engines.items():
            engine.save_checkpoint(tmp, tag=name, save_latest=False)
        torch.save({"rng": get_rng_state(), **(rank_state or {})}, os.path.join(tmp, f"rank_{distributed.rank()}.pt"))
        for name, tensors in (weights or {}).items():
            if tensors:
                from safetensors.torch import save_file

                save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                          os.path.join(tmp, f"{name}_rank_{distributed.rank()}.safetensors"))
        if distributed.is_rank_0():
            state = {"position": asdict(position), "metrics_history": metrics.history, "step_state": step_state or {},
                     "run": {"world_size": distributed.world_size(), "flags": fixed_flag_values(self.config),
                             "program": type(self.config).__name__, "engines": list(self.engines),
                             "data": self.data_key}}
            with open(os.path.join(tmp, _TRAINER_STATE), "w", encoding="utf-8") as f:
                json.dump(state, f, indent=1)

    def latest(self) -> str | None:
        found = list_checkpoints(self.root)
        return found[-1] if found else None

    def finish(self) -> None:
        """After the final model is saved: drop the checkpoints unless --keep_checkpoints."""
        if distributed.is_rank_0() and not self.config.keep_checkpoints:
            # (steps 1/2/DPO: the atomic model save carried the checkpoints into the new output_dir)
            shutil.rmtree(self.root, ignore_errors=True)
        distributed.barrier()

    # ------------------------------------------------------------------ faults
    def watch_signals(self) -> None:
        """From now on SIGTERM/SIGINT ask for a checkpoint and exit at the next step boundary.

        Further signals are ignored (a scheduler signals every process and the deepspeed launcher then
        signals its ranks again), except a second SIGINT, a person's second Ctrl-C, which exits at once.
        """
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
            say(f"[rank {distributed.rank()}] {signal.Signals(signum).name}: saving a checkpoint at the end of this "
                "step, then exiting (a second Ctrl-C exits at once)")  # (not print: stdout may be a dead pipe)
        elif signum == signal.SIGINT == self.stop_signal:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def step_boundary(self, position: Position, losses: list[float], metrics, state_fn=None) -> None:
        """Call at every optimizer-step boundary with the losses seen since the last one.

        Stops (raises) on a non-finite loss on any rank, keeping the last good checkpoint; saves a checkpoint
        when --save_interval says so; on SIGTERM/SIGINT saves one and exits. One all-reduce, so all ranks
        agree. `state_fn()` returns the keyword arguments of `save` beyond position and metrics.
        """
        nonfinite = float(any(not math.isfinite(x) for x in losses))
        bad, signalled = distributed.all_reduce_sum([nonfinite, float(self.stop_signal is not None)], self.device)
        if bad:
            last = self.latest()
            keep = (f"the last good checkpoint is {last} (continue from it with --resume, e.g. with a lower "
                    "--learning_rate)" if last else "no checkpoint was saved yet (use --save_interval N)")
            raise NonFiniteLossError(f"non-finite loss at epoch {position.epoch + 1}, optimizer step "
                                     f"{position.global_step}: training stopped; {keep}")
        if not (signalled or self.due(position.global_step)):
            return
        saved = self.save(position, metrics, **(state_fn() if state_fn else {}))
        if signalled:
            signum = self.stop_signal or signal.SIGTERM
            distributed.print_rank_0(f"stopped by {signal.Signals(signum).name} after step {position.global_step}: "
                                 f"continue with the same command plus --resume (checkpoint {saved})")
            distributed.shutdown_distributed()
            raise SystemExit(128 + signum)


def optimizer_settings(engine) -> list[tuple[float, float]]:
    """(base learning rate, weight decay) of each parameter group, as this run's flags configured them."""
    if engine.lr_scheduler is None:
        return []
    groups = engine.lr_scheduler.optimizer.param_groups
    return [(base_lr, group.get("weight_decay", 0.0)) for base_lr, group in zip(engine.lr_scheduler.base_lrs, groups)]


@contextlib.contextmanager
def weights_only_loads():
    """DeepSpeed reads checkpoints with torch.load(weights_only=False); torch's own switch makes those
    loads weights_only=True, with the few DeepSpeed classes its checkpoints hold allowed, so resuming
    never runs code pickled into a file."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
            yield
    finally:
        if previous is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def module_shard(module) -> dict[str, torch.Tensor]:
    """This rank's share of a module's parameters, for `Checkpointer.save(weights=...)`: its ZeRO-3 partitions,
    or (not partitioned) the whole parameters on rank 0 and nothing elsewhere."""
    partitioned = any(hasattr(p, "ds_id") for p in module.parameters())
    if not partitioned and not distributed.is_rank_0():
        return {}
    return {name: (p.ds_tensor if partitioned else p).detach() for name, p in module.named_parameters()}


def restore_module_shard(module, path: str, name: str) -> None:
    """Load what `module_shard` saved under `name` in checkpoint `path` back into `module` (same topology)."""
    from safetensors.torch import load_file

    own = os.path.join(path, f"{name}_rank_{distributed.rank()}.safetensors")
    saved = load_file(own if os.path.exists(own) else os.path.join(path, f"{name}_rank_0.safetensors"))
    with torch.no_grad():
        for param_name, p in module.named_parameters():
            (p.ds_tensor if hasattr(p, "ds_id") else p).copy_(saved[param_name])
