"""Training metrics: live TensorBoard scalars on rank 0 and a history saved with the model (JSONL and a PNG)."""
import json
import os

from training.utils import distributed

# How a step reports an evaluation over an empty eval split: absent, never as numbers (a loss of 0 over no
# tokens, an accuracy over no pairs) that would be logged, plotted and, in step 2, saved as statistics.
NO_EVAL_DATA = "no eval data (the eval split is empty)"


class MetricsLog:
    """TensorBoard scalars (live, rank 0) plus an in-memory history that is saved with the model.

    The history goes into the output directory as `training_metrics.jsonl` and a PNG of the curves,
    written inside the same atomic save as the weights.
    """

    def __init__(self, enabled: bool, tb_dir: str):
        self.history: list[dict] = []
        self.writer = None
        if enabled and distributed.is_rank_0():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tb_dir)

    def log(self, step: int, **scalars: float) -> None:
        self.history.append({"step": step, **scalars})
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)

    def log_eval(self, step: int, stats: dict | None) -> None:
        """An evaluation's figures as `eval/<name>` scalars; None (no eval data) logs nothing, and the "pairs"
        count is not a metric."""
        if stats is not None:
            self.log(step, **{f"eval/{k}": v for k, v in stats.items() if k != "pairs"})

    def write(self, directory: str, title: str) -> None:
        """Write `training_metrics.jsonl` and `training_curves.png` (one panel per scalar) into `directory`."""
        with open(os.path.join(directory, "training_metrics.jsonl"), "w", encoding="utf-8") as f:
            for row in self.history:
                f.write(json.dumps(row) + "\n")
        names = sorted({k for row in self.history for k in row if k != "step"})
        if not names:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
        for ax, name in zip(axes[0], names):
            points = [(row["step"], row[name]) for row in self.history if name in row]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 30 else None)
            ax.set_title(name)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(os.path.join(directory, "training_curves.png"), dpi=90)
        plt.close(fig)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
