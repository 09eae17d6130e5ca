"""The bookkeeping of a supervised training loop (steps 1, 2 and DPO), so each recipe shows only its
forward, loss, backward and step.

    loop = TrainLoop(start, config.num_train_epochs, config.print_loss)
    for epoch in loop.epochs(train_loader):
        for batch in loop.batches(train_loader):
            ...forward, loss, engine.backward(loss)...
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            loop.record(loss.item(), samples=..., tokens=...)
            if boundary:
                losses = loop.optimizer_step()   # the losses since the last optimizer step
                checkpoints.step_boundary(loop.position, losses, metrics)
        summary = loop.epoch_summary()
"""
import time
from dataclasses import dataclass

from training.utils import distributed


@dataclass
class Position:
    """Where training stands: resume starts epoch `epoch` after its first `batches_done` batches."""
    epoch: int = 0
    batches_done: int = 0
    global_step: int = 0


@dataclass
class EpochSummary:
    mean_loss: float
    samples_per_s: float  # all ranks together
    tokens_per_s: float
    elapsed_s: float


class TrainLoop:
    """Epoch and step counters, per-epoch meters, the progress bar and --print_loss."""

    def __init__(self, start: Position, num_epochs: int, print_loss: bool = False):
        self.start, self.num_epochs, self.print_loss = start, num_epochs, print_loss
        self.epoch, self.batches_done, self.global_step = start.epoch, start.batches_done, start.global_step
        self._bar = None

    @property
    def position(self) -> Position:
        return Position(self.epoch, self.batches_done, self.global_step)

    def epochs(self, loader):
        """The remaining epochs; each sets the loader's sampler epoch (its shuffle) and resets the meters."""
        for epoch in range(self.start.epoch, self.num_epochs):
            loader.sampler.set_epoch(epoch)
            self.epoch = epoch
            self.batches_done = self.start.batches_done if epoch == self.start.epoch else 0
            self._loss_sum, self._batches, self._samples, self._tokens = 0.0, 0, 0, 0
            self._step_losses: list[float] = []
            self._epoch_start = time.time()
            yield epoch

    def batches(self, loader):
        self._bar = distributed.progress(loader, desc=f"epoch {self.epoch + 1}/{self.num_epochs}")
        return self._bar

    def record(self, loss: float, samples: int, tokens: int = 0) -> None:
        """One micro-batch done."""
        self._step_losses.append(loss)
        self._loss_sum += loss
        self._batches += 1
        self.batches_done += 1
        self._samples += samples
        self._tokens += tokens
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)  # redrawn at the bar's own interval
        if self.print_loss:
            print(f"[rank {distributed.rank()}] epoch {self.epoch + 1} step {self.global_step} loss {loss:.4f}",
                  flush=True)

    def optimizer_step(self) -> list[float]:
        """An optimizer step happened: count it and return the micro-batch losses it was made of."""
        self.global_step += 1
        losses, self._step_losses = self._step_losses, []
        return losses

    def epoch_summary(self) -> EpochSummary:
        elapsed = max(time.time() - self._epoch_start, 1e-9)
        world = distributed.world_size()
        return EpochSummary(self._loss_sum / max(self._batches, 1), self._samples * world / elapsed,
                            self._tokens * world / elapsed, elapsed)


def start_run(config):
    """The process group (as the launcher set it up), the --output_dir held for this run (rank 0 locks it and
    checks every output path, see output_dir.hold_output_dir) and the seeded RNGs; returns this rank's device."""
    from training.utils import seeding
    from training.utils.output_dir import hold_output_dir

    device = distributed.init_distributed(config.local_rank)
    distributed.run_on_rank_0(hold_output_dir, config)
    seeding.set_random_seed(config.seed)
    return device


def finish_run(checkpoints, metrics, message: str) -> None:
    """After the final save: drop the checkpoints (unless kept), close TensorBoard, say what was saved, and
    tear the process group down."""
    checkpoints.finish()
    metrics.close()
    distributed.print_rank_0(message)
    distributed.shutdown_distributed()
