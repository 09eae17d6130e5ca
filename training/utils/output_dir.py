"""The --output_dir a step saves into: what an earlier run left there, and whether saving may replace it."""
import os

from training.utils.atomic_dir import is_run_artifact
from training.utils.errors import UserInputError

# What a step saves, as `saved_kind` names what a directory holds.
LANGUAGE_MODEL, REWARD_MODEL, RLHF_MODELS = "language model", "reward model", "step-3 actor/ and critic/"
RLHF_SUBDIRS = ("actor", "critic", "actor_ema")


def saved_kind(directory: str) -> str | None:
    """What an earlier run saved in `directory`: a language model, a reward model, step 3's models, or None."""
    from training.utils.model.reward_model import is_reward_model_dir  # (here: chat.py's flags import this module)

    if is_reward_model_dir(directory):
        return REWARD_MODEL
    if os.path.isfile(os.path.join(directory, "config.json")):
        return LANGUAGE_MODEL
    if any(os.path.isdir(os.path.join(directory, sub)) for sub in RLHF_SUBDIRS):
        return RLHF_MODELS
    return None


def check_output_dir(output_dir: str, saves: str, inputs: dict[str, list[str | None]]) -> None:
    """Refuse an --output_dir whose save would destroy something, before any work (so nothing is written).

    Saving replaces the whole directory (steps 1 and 2) or its actor/, critic/ and actor_ema/ (step 3)
    in one rename (training.utils.atomic_dir), keeping only run artifacts: logs, checkpoints, TensorBoard events.
    So the directory must not hold this run's inputs, another step's output, or unrelated files.
    """
    out = os.path.realpath(output_dir)
    replaced = [os.path.join(out, sub) for sub in RLHF_SUBDIRS] if saves == RLHF_MODELS else [out]
    for flag, paths in inputs.items():
        for path in filter(None, paths):
            real = os.path.realpath(path)
            if os.path.exists(real) and any(os.path.commonpath([real, r]) == r for r in replaced):
                raise UserInputError(f"--output_dir '{output_dir}' would overwrite the input {flag} '{path}' when "
                                     "the result is saved: pass a different --output_dir")
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise UserInputError(f"--output_dir '{output_dir}' is a file, not a directory: pass a directory path")
    found = saved_kind(out)
    if found not in (None, saves):
        raise UserInputError(f"--output_dir '{output_dir}' holds another run's {found}, which saving this "
                             f"{saves} would replace: pass a new directory")
    if found is None and saves != RLHF_MODELS:
        others = sorted(e for e in os.listdir(out) if not is_run_artifact(os.path.join(out, e)))
        if others:
            raise UserInputError(f"--output_dir '{output_dir}' holds files that are not a saved model "
                                 f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}), which saving "
                                 "would delete: pass a new or empty directory")
