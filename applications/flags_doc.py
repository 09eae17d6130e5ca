"""Write docs/flags.md, the reference of every program's flags, from the configurations that define them.

    python applications/flags_doc.py            # rewrite docs/flags.md
    python applications/flags_doc.py --check    # exit 1 when docs/flags.md is out of date (the tests run this)
"""
import sys
from pathlib import Path

from applications.chat import ChatConfig
from applications.serve import ServeConfig
from training.step1_supervised_finetuning.main import SFTConfig
from training.step1_supervised_finetuning.prompt_eval import PromptEvalConfig
from training.step2_dpo_finetuning.main import DPOConfig
from training.step2_reward_model_finetuning.main import RewardConfig
from training.step2_reward_model_finetuning.rw_eval import RewardEvalConfig
from training.step3_rlhf_finetuning.main import RLHFConfig
from training.utils.config import FIXED, flag_groups

DOC = Path(__file__).resolve().parents[1] / "docs" / "flags.md"
PROGRAMS = (
    ("Step 1: `training/step1_supervised_finetuning/main.py`", SFTConfig),
    ("Step 2: `training/step2_reward_model_finetuning/main.py`", RewardConfig),
    ("Step 2 alternative, DPO: `training/step2_dpo_finetuning/main.py`", DPOConfig),
    ("Step 3: `training/step3_rlhf_finetuning/main.py`", RLHFConfig),
    ("`training/step1_supervised_finetuning/prompt_eval.py`", PromptEvalConfig),
    ("`training/step2_reward_model_finetuning/rw_eval.py`", RewardEvalConfig),
    ("`applications/chat.py`", ChatConfig),
    ("`applications/serve.py`", ServeConfig),
)


def _cell(value) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text.replace("|", "\\|")


def render() -> str:
    lines = ["# Flags", "",
             "Generated from the configurations by `python applications/flags_doc.py`; do not edit by hand.",
             "Each flag is defined once (`training/utils/flags.py`, `training/utils/data/pipeline.py`,",
             "`training/utils/checkpoint.py`, `training/utils/rlhf/config.py` or the program itself). [new] marks",
             "additions beyond DeepSpeed-Chat. *Fixed on resume*: `--resume` refuses a value other than the",
             "checkpoint's (it fixes the data order, the schedule or the saved state).", ""]
    for title, cls in PROGRAMS:
        lines += [f"## {title}", ""]
        for group_title, options in flag_groups(cls):
            lines += [f"**{group_title}**", "", "| flag | default | fixed on resume | meaning |",
                      "| --- | --- | --- | --- |"]
            for name, default, required, resume, text in options:
                lines.append(f"| `--{name}` | {'required' if required else _cell(default)} | "
                             f"{'yes' if resume == FIXED else ''} | {text.replace('%%', '%').replace('|', '/')} |")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render()
    if "--check" in argv:
        if not DOC.exists() or DOC.read_text(encoding="utf-8") != text:
            print(f"{DOC} is out of date: run python applications/flags_doc.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text, encoding="utf-8")
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
