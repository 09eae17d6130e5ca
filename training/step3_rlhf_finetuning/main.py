"""Step 3: RLHF of the actor with PPO against the step-2 reward model, or critic-free (GRPO, RLOO, REINFORCE++,
ReMax) against a reward model and/or a rule reward.

    deepspeed main.py --actor_model_name_or_path out/actor --critic_model_name_or_path out/reward \
        --data_path synthetic/copy --output_dir out/step3
    deepspeed main.py --actor_model_name_or_path out/actor --advantage_estimator grpo --n_samples_per_prompt 4 \
        --reward_function synthetic --data_path synthetic/copy --output_dir out/step3_grpo

Recipe: parse flags -> tokenizer -> phase-3 prompts (capped at --max_prompt_seq_len) -> optional
pre-training text (PPO-ptx) -> the RLHF engine (actor, reference, optional EMA, critic, reward model)
-> held-out evaluation -> steps: generate --generation_batches batches of experience (advantages computed per
batch), then --ppo_epochs passes of mini-batch PPO updates over them (+ the PPO-ptx loss), EMA update, adapt the
KL coefficient, one log line, held-out evaluation every --eval_interval steps -> save actor/,
critic/ (when there is a critic) and actor_ema/.

A "step" is one such round of generation and training; --eval_interval, --print_answers_interval
and --test_stop_step count these.
"""
import os
import time

from training.utils import distributed
from training.utils.checkpoint import Checkpointer
from training.utils.config import flag_values, parse_config
from training.utils.data.chat_format import PROMPT_FORMAT_FILE, resolve_prompt_format
from training.utils.data.collators import PromptCollator
from training.utils.data.pipeline import PHASE_RLHF, build_phase_data, make_loader
from training.utils.data.unsupervised import build_unsupervised_dataset, make_unsupervised_loader
from training.utils.engine import training_dtype
from training.utils.errors import report_user_errors
from training.utils.loop import Position, finish_run, start_run
from training.utils.metrics_log import MetricsLog
from training.utils.model.reward_model import save_reward_model
from training.utils.model.save import save_hf_format, saving_set
from training.utils.output_dir import RLHF_SUBDIRS
from training.utils.precision import TORCH_DTYPES
from training.utils.rlhf.config import RLHFConfig, check_input_models
from training.utils.rlhf.engine import build_rlhf_engine, optimizer_steps_per_epoch
from training.utils.rlhf.experience import CappedPrompts, EndlessBatches, ExperienceBuffer
from training.utils.rlhf.metrics import describe_evaluation, describe_step, evaluate_policy, show_answer, step_metrics
from training.utils.rlhf.ppo_trainer import PPOTrainer, sequence_width_multiple
from training.utils.rlhf.rewards import check_references, load_reward_function
from training.utils.rlhf.run_state import RLHFRunState
from training.utils.tokenizer import load_tokenizer


def parse_args(argv=None) -> RLHFConfig:
    return parse_config(RLHFConfig, argv, "Step 3: RLHF of the actor with PPO.")


def evaluate(trainer, loader, metrics, step: int, seed: int) -> None:
    if loader is None:  # no held-out prompts: nothing is logged, rather than numbers over no answers
        if step == 0:
            distributed.print_rank_0("eval: no eval data (no held-out prompts: the phase-3 eval split is empty or "
                                     "--eval_prompts is 0)")
        return
    values = evaluate_policy(trainer, loader, seed)
    metrics.log(step, **values)
    distributed.print_rank_0(f"eval after step {step}: {describe_evaluation(values)}")


@report_user_errors
def main(argv=None) -> None:
    config = parse_args(argv)
    device = start_run(config)

    tokenizer = load_tokenizer(config.actor.model_name_or_path, config.add_eot_token, config.eot_token,
                               config.trust_remote_code)
    prompt_format = resolve_prompt_format(tokenizer, config, config.model_paths())
    check_input_models(config)
    # A --reward_function file is imported now, so a missing file or function fails before any data or model.
    reward_function = load_reward_function(config.rl.reward_function) if config.rl.reward_function else None
    data = build_phase_data(config.data, prompt_format, PHASE_RLHF)
    bos = prompt_format.bos_id
    prompts = CappedPrompts(data.train, config.max_prompt_seq_len, config.prompt_overflow, bos)
    eval_prompts = CappedPrompts(data.eval, config.max_prompt_seq_len, config.prompt_overflow, bos, config.eval_prompts)
    collator = PromptCollator(tokenizer.pad_token_id, width_multiple=sequence_width_multiple(
        device.type, TORCH_DTYPES[training_dtype(config, device)]))
    # Length-grouped prompts: one generation batch pads its prompts less (answers end where they end).
    prompt_loader = make_loader(prompts, config.per_device_generation_batch_size, collator, config.seed, shuffle=True,
                                length_grouped=config.data.group_by_length)
    eval_loader = (make_loader(eval_prompts, config.per_device_generation_batch_size, collator, config.seed,
                               shuffle=False) if len(eval_prompts) else None)
    data.stats["prompt_limit"] = {"train": prompts.counts, "eval": eval_prompts.counts}
    if config.rl.reward_function:  # the math reward needs every row's reference answer: refuse data without them
        check_references(config.rl.reward_function, prompts.references() + eval_prompts.references())
    distributed.print_rank_0(f"data: {len(prompts)} train / {len(eval_prompts)} eval prompts (cache {data.cache_dir}; "
                             f"over --max_prompt_seq_len {config.max_prompt_seq_len}: {prompts.counts}; format: "
                             f"{prompt_format.describe()})")
    unsup_batches = None
    if config.unsupervised_dataset_name:
        blocks = build_unsupervised_dataset(config.unsupervised_dataset_name, config.unsupervised_dataset_config_name,
                                            tokenizer, config.max_prompt_seq_len + config.max_answer_seq_len,
                                            config.data.data_output_path, config.seed)
        unsup_batches = EndlessBatches(make_unsupervised_loader(blocks, config.per_device_training_batch_size,
                                                                config.seed))

    actor_steps, critic_steps = optimizer_steps_per_epoch(config, len(prompt_loader))
    rlhf_engine = build_rlhf_engine(config, tokenizer, device, actor_steps, critic_steps)
    trainer = PPOTrainer(rlhf_engine, config, prompt_format.stop_token_ids, reward_function)
    distributed.print_rank_0(f"advantages: {config.rl.advantage_estimator}, {config.rl.n_samples_per_prompt} "
                             f"answer(s) per prompt; rewards: {trainer.scorer.describe()}")
    distributed.print_rank_0(f"scoring: {trainer.scoring_plan}")
    # PPO whitens GAE advantages over the buffer; the critic-free estimators normalise their own (or, Dr. GRPO,
    # on purpose not).
    whiten = not config.rl.critic_free and not config.ppo.no_whiten_advantages
    buffer = ExperienceBuffer(config.generation_batches, whiten, tokenizer.pad_token_id, config.seed)

    metrics = MetricsLog(config.enable_tensorboard, f"{config.tensorboard_path}/step3_rlhf")
    trained = {"actor": rlhf_engine.actor, "critic": rlhf_engine.critic}
    checkpoints = Checkpointer(config, {name: e for name, e in trained.items() if e is not None}, device, data=data)
    if config.resume is None:
        evaluate(trainer, eval_loader, metrics, 0, config.seed)
    run_state = RLHFRunState(trainer, rlhf_engine, buffer, unsup_batches)
    start, saved_state = checkpoints.resume(metrics, loaders=[prompt_loader],
                                            rank_state_consumers=[run_state.load_rank_state])
    if config.resume is not None:
        run_state.load_state_dict(saved_state, checkpoints.resumed_from)
    checkpoints.watch_signals()

    step, rollouts, round_start, stop = start.global_step, [], time.perf_counter(), False
    for epoch in range(start.epoch, config.num_train_epochs):
        prompt_loader.sampler.set_epoch(epoch)
        batches_done = start.batches_done if epoch == start.epoch else 0
        for prompt_batch in distributed.progress(prompt_loader, desc=f"epoch {epoch + 1}/{config.num_train_epochs}"):
            experience, rollout = trainer.generate_experience(prompt_batch)
            buffer.add(experience)
            rollouts.append(rollout)
            batches_done += 1
            if not buffer.full:
                continue
            step += 1
            if config.print_answers and step % config.print_answers_interval == 0:
                show_answer(tokenizer, experience, step)

            train_start, stats = time.perf_counter(), []
            for _ in range(config.ppo_epochs):
                for minibatch in buffer.minibatches(config.per_device_training_batch_size):
                    stats.append(trainer.train_rlhf(minibatch))
                    if unsup_batches is not None:
                        stats[-1]["unsup_loss"] = trainer.train_unsupervised(next(unsup_batches), config.unsup_coef)
            trainer.update_ema()
            end = time.perf_counter()

            values = step_metrics(rollouts, stats, device, training_s=end - train_start, elapsed_s=end - round_start)
            trainer.kl_ctl.update(values["kl/to_reference"], len(buffer.rows) * distributed.world_size())
            values["kl/coef"] = trainer.kl_ctl.value
            metrics.log(step, **values)
            distributed.print_rank_0(describe_step(step, values))
            buffer.clear()

            if config.eval_interval and step % config.eval_interval == 0:
                evaluate(trainer, eval_loader, metrics, step, config.seed)
            losses = [row[k] for row in stats for k in ("actor_loss", "critic_loss", "unsup_loss") if k in row]
            checkpoints.step_boundary(Position(epoch, batches_done, step), losses + [values["reward/mean"]], metrics,
                                      run_state.state_dict)
            if config.enable_test_mode and step >= config.test_stop_step:
                stop = True
                break
            rollouts, round_start = [], time.perf_counter()
        if stop:
            break
    if not config.eval_interval or step % config.eval_interval:
        evaluate(trainer, eval_loader, metrics, step, config.seed)

    extra = {"training_args.json": flag_values(config), "data_stats.json": data.stats,
             PROMPT_FORMAT_FILE: prompt_format.record()}
    rlhf_engine.actor.train()  # the Hybrid Engine's inference kernels out, LoRA unfused
    title = config.rl.advantage_estimator.upper() if config.rl.critic_free else "PPO"
    # actor/, critic/, actor_ema/ replaced as one set: a member this run does not save (no critic, no EMA) is
    # removed from --output_dir rather than left from an earlier run.
    with saving_set(config.output_dir, RLHF_SUBDIRS) as staging:
        save_hf_format(rlhf_engine.actor.module, tokenizer, os.path.join(staging, "actor"), extra_json=extra,
                       metrics=metrics, metrics_title=f"step 3: {title}")
        if rlhf_engine.critic is not None:
            # The critic keeps the reward-model format (it loads as one), but its scores are values now, not the
            # reward model's calibrated scores: no reward statistics go with it.
            save_reward_model(rlhf_engine.critic.module, tokenizer, os.path.join(staging, "critic"), reward_stats={},
                              extra_json=extra)
        if rlhf_engine.actor_ema is not None:
            save_hf_format(rlhf_engine.actor_ema.module, tokenizer, os.path.join(staging, "actor_ema"),
                           extra_json=extra)
    saved = "actor/" + (", critic/" if rlhf_engine.critic is not None else "") + (
        ", actor_ema/" if config.enable_ema else "")
    finish_run(checkpoints, metrics, f"saved {saved} to {config.output_dir}")


if __name__ == "__main__":
    main()
