"""Step 3's resumable state beyond the DeepSpeed engines' own, as one object for the checkpoints."""
from training.utils.checkpoint import module_shard, restore_module_shard


class RLHFRunState:
    """KL controller, reward normaliser, PPO-ptx position, the experience buffer's shuffle generator and
    the EMA weights. The experience buffer itself is empty at a step boundary, where checkpoints are taken.

    `state_dict()` gives Checkpointer.save's keyword arguments: `step_state` (JSON, rank 0's is kept),
    `rank_state` (this rank's tensors) and `weights` (this rank's EMA shard, saved as safetensors).
    """

    def __init__(self, trainer, rlhf_engine, buffer, unsup_batches):
        self.trainer, self.engine, self.buffer, self.unsup_batches = trainer, rlhf_engine, buffer, unsup_batches

    def state_dict(self) -> dict:
        ema = self.engine.actor_ema
        return {"step_state": {"kl_controller": self.trainer.kl_ctl.state_dict(),
                               "reward_normalizer": self.trainer.reward_normalizer.state_dict(),
                               "unsupervised_batches_drawn": self.unsup_batches.drawn if self.unsup_batches else 0},
                "rank_state": {"buffer_generator": self.buffer.generator.get_state()},
                "weights": {"actor_ema": module_shard(ema.module) if ema is not None else {}}}

    def load_rank_state(self, rank_state: dict) -> None:
        """This rank's part (Checkpointer.resume calls it before restoring the RNG states)."""
        self.buffer.generator.set_state(rank_state["buffer_generator"])

    def load_state_dict(self, step_state: dict, checkpoint_dir: str) -> None:
        self.trainer.kl_ctl.load_state_dict(step_state["kl_controller"])
        self.trainer.reward_normalizer.load_state_dict(step_state["reward_normalizer"])
        if self.unsup_batches is not None:
            self.unsup_batches.drawn = step_state["unsupervised_batches_drawn"]
        if self.engine.actor_ema is not None:
            restore_module_shard(self.engine.actor_ema.module, checkpoint_dir, "actor_ema")
