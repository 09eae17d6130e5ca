"""The typed configurations: every flag is defined once, documented, range-checked where it is defined,
and the generated parsers keep DeepSpeed-Chat's names and defaults."""
import dataclasses
import math
import re
from pathlib import Path

import pytest

from training.utils.config import (
    FIXED,
    at_least,
    build_parser,
    check_options,
    configuration,
    fixed_flag_values,
    flag_definitions,
    flag_values,
    group,
    option,
    parse_config,
)
from training.utils.errors import UserInputError

ROOT = Path(__file__).resolve().parents[1]


def programs() -> dict:
    """Every program's configuration class."""
    from applications.chat import ChatConfig
    from applications.serve import ServeConfig
    from training.step1_supervised_finetuning.main import SFTConfig
    from training.step1_supervised_finetuning.prompt_eval import PromptEvalConfig
    from training.step2_dpo_finetuning.main import DPOConfig
    from training.step2_reward_model_finetuning.main import RewardConfig
    from training.step2_reward_model_finetuning.rw_eval import RewardEvalConfig
    from training.step3_rlhf_finetuning.main import RLHFConfig

    return {"step1": SFTConfig, "step2": RewardConfig, "dpo": DPOConfig, "step3": RLHFConfig, "chat": ChatConfig,
            "prompt_eval": PromptEvalConfig, "rw_eval": RewardEvalConfig, "serve": ServeConfig}


def test_each_flag_has_one_definition_and_help_text():
    definitions: dict[str, set[int]] = {}
    for name, cls in programs().items():
        flags = flag_definitions(cls)
        names = [flag for flag, *_ in flags]
        assert len(names) == len(set(names)), f"{name}: a flag twice in one parser"
        for flag, definition, text, _ in flags:
            assert text.strip(), f"{name}: --{flag} has no help"
            assert "{role}" not in text
            definitions.setdefault(flag, set()).add(definition)
    redefined = {flag: ids for flag, ids in definitions.items() if len(ids) > 1}
    assert not redefined, f"flags defined more than once: {sorted(redefined)}"


@pytest.mark.parametrize("program", ["step1", "step2", "dpo", "step3", "chat", "prompt_eval", "rw_eval", "serve"])
def test_help_prints_for_every_program(program, capsys):
    """--help renders every help text (a bare '%' in one made argparse crash for every step)."""
    with pytest.raises(SystemExit) as stop:
        parse_config(programs()[program], ["--help"], program)
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")


def test_no_flag_is_added_by_hand():
    """Parsers are generated: no add_argument outside the generator (the e2e driver's own dashed flags aside)."""
    offenders = []
    for path in list((ROOT / "training").rglob("*.py")) + list((ROOT / "inference").rglob("*.py")) + [
            ROOT / "applications" / "chat.py", ROOT / "applications" / "serve.py"]:
        # (the two asset makers regenerate shipped files; their few flags are theirs alone)
        maker = path.name in ("train_tokenizer.py", "synthetic.py")
        if path.name != "config.py" and not maker and "add_argument(" in path.read_text(encoding="utf-8"):
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_deepspeed_chat_names_and_defaults_are_kept():
    from training.step1_supervised_finetuning.main import SFTConfig
    from training.step2_dpo_finetuning.main import DPOConfig
    from training.step2_reward_model_finetuning.main import RewardConfig
    from training.step3_rlhf_finetuning.main import RLHFConfig

    defaults = {cls: {flag: default for flag, _, _, default in flag_definitions(cls)}
                for cls in (SFTConfig, RewardConfig, DPOConfig, RLHFConfig)}
    assert defaults[SFTConfig] | {"data_path": ["Dahoas/rm-static"], "data_split": "2,4,4", "learning_rate": 1e-3,
                                  "per_device_train_batch_size": 16, "max_seq_len": 512, "lora_module_name":
                                  "decoder.layers.", "tensorboard_path": "step1_tensorboard"} == defaults[SFTConfig]
    assert defaults[RewardConfig]["learning_rate"] == 5e-5 and defaults[RewardConfig]["eval_iters"] == 100
    assert defaults[DPOConfig]["beta"] == 0.1 and defaults[DPOConfig]["label_smoothing"] == 0.0
    step3 = defaults[RLHFConfig]
    assert (step3["actor_learning_rate"], step3["critic_learning_rate"], step3["num_warmup_steps"],
            step3["unsup_coef"], step3["actor_zero_stage"]) == (9.65e-6, 5e-6, 100, 27.8, 0)
    for flag in ("actor_lora_dim", "critic_lora_module_name", "actor_gradient_checkpointing", "critic_dropout",
                 "actor_weight_decay", "critic_model_name_or_path", "enable_hybrid_engine", "inference_tp_size",
                 "offload_reference_model", "offload_reward_model", "enable_ema", "print_answers_interval",
                 "per_device_generation_batch_size", "generation_batches", "ppo_epochs", "test_stop_step"):
        assert flag in step3, flag


def test_parsed_values_land_in_their_groups(tmp_path):
    from training.step3_rlhf_finetuning.main import parse_args

    config = parse_args(["--actor_model_name_or_path", "tiny/opt", "--critic_model_name_or_path", "tiny/opt",
                         "--output_dir", str(tmp_path / "out"), "--actor_learning_rate", "0.5",
                         "--critic_lora_dim", "4", "--temperature", "0.7", "--gamma", "0.9",
                         "--data_path", "a.jsonl", "b.jsonl", "--deepspeed"])
    assert (config.actor.learning_rate, config.critic.learning_rate, config.critic.lora_dim) == (0.5, 5e-6, 4)
    assert (config.sampling.temperature, config.ppo.gamma, config.data.data_path) == (0.7, 0.9, ["a.jsonl", "b.jsonl"])
    flat = flag_values(config)
    assert flat["actor_learning_rate"] == 0.5 and flat["critic_lora_dim"] == 4 and flat["gamma"] == 0.9
    fixed = fixed_flag_values(config)
    assert "critic_lora_dim" in fixed and "data_path" in fixed and "print_answers" not in fixed


@pytest.mark.parametrize("flag, value, message", [
    ("--learning_rate", "nan", "not a finite number"),
    ("--learning_rate=-1e-3", None, "--learning_rate must be positive"),
    ("--dropout", "1.5", "--dropout must be in [0.0, 1.0)"),
    ("--data_split", "nan,4,4", "--data_split must be three finite"),
    ("--lora_dim", "-2", "--lora_dim must be at least 0"),
    ("--weight_decay", "-0.1", "--weight_decay must be at least 0.0"),
    ("--seed", "-1", "--seed must be in [0, 4294967295]"),
    ("--gradient_accumulation_steps", "0", "--gradient_accumulation_steps must be at least 1"),
])
def test_bad_values_are_refused_in_one_line(tmp_path, capsys, flag, value, message):
    from training.step1_supervised_finetuning.main import parse_args

    argv = ["--model_name_or_path", "tiny/opt", "--output_dir", str(tmp_path / "out"), flag]
    argv += [value] if value else []
    with pytest.raises((UserInputError, SystemExit)) as caught:
        parse_args(argv)
    text = str(caught.value) if caught.type is UserInputError else capsys.readouterr().err
    assert message in text
    assert len(text.strip().splitlines()) == 1


def test_generated_machinery_on_a_small_configuration():
    @dataclasses.dataclass
    class Inner:
        """inner"""
        rate: float = option(0.1, "Rate of {role}.", check=at_least(0.0), resume=FIXED)

    @configuration(size=3)
    class Outer(Base):
        first: Inner = group(Inner, prefix="first_", role="the first", rate=0.5)
        second: Inner = group(Inner, prefix="second_", role="the second")
        names: list[str] = option(["a"], "Names.")

    helps = {flag: text for flag, _, text, _ in flag_definitions(Outer)}
    assert helps["first_rate"] == "Rate of the first." and helps["second_rate"] == "Rate of the second."
    config = parse_config(Outer, ["--first_rate", "2", "--names", "x", "y"])
    assert (config.first.rate, config.second.rate, config.size, config.names) == (2.0, 0.1, 3, ["x", "y"])
    assert Outer().size == 3 and Outer().first.rate == 0.5
    assert fixed_flag_values(config) == {"first_rate": 2.0, "second_rate": 0.1}
    with pytest.raises(UserInputError, match="--second_rate must be at least 0.0"):
        check_options(Outer(second=Inner(rate=-1.0)))
    assert "--first_rate" in build_parser(Outer).format_help()
    assert math.isclose(parse_config(Outer, []).first.rate, 0.5)


@dataclasses.dataclass
class Base:
    """base"""
    size: int = option(1, "Size.", check=at_least(1))


def test_readme_flag_tables_match_the_configurations():
    """Every flag the README's tables name in backticks exists in some program, and every [new] flag of the
    training steps is mentioned in the README."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    known = {flag for cls in programs().values() for flag, *_ in flag_definitions(cls)}
    table_flags = set(re.findall(r"^\|\s*`--([a-z0-9_]+)`", readme, flags=re.MULTILINE))
    assert table_flags, "the README has flag tables"
    assert table_flags <= known, f"README lists flags no program has: {sorted(table_flags - known)}"
    for cls in [c for k, c in programs().items() if k in ("step1", "step2", "dpo", "step3")]:
        for flag, _, text, _ in flag_definitions(cls):
            if text.startswith("[new]"):
                assert f"--{flag}" in readme, f"--{flag} is [new] but the README does not mention it"


def test_flag_reference_is_up_to_date():
    from applications import flags_doc

    assert flags_doc.main(["--check"]) == 0, "docs/flags.md is stale: run python applications/flags_doc.py"
