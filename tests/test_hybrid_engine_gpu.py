"""Hybrid Engine parity: greedy generation through DeepSpeed's inference kernels must equal plain Hugging
Face `generate` on the same weights. Needs a CUDA GPU (DeepSpeed has no inference kernels elsewhere).

For each tiny shape the actor is built as step 3 builds it (a train config with the hybrid_engine block,
fp16, ZeRO 0 or 3), then the same prompts are decoded greedily twice: `engine.generate` (the kernels) and
`engine.module.generate` after `engine.train()` (the training modules, i.e. Hugging Face's own code). The
final layer norm is scaled up first so the logits have wide margins: a random model has near ties that
fp16 rounding alone could flip, which would make the comparison test noise, not the kernels.

Each case runs in its own process (`python tests/test_hybrid_engine_gpu.py MODEL STAGE`), so it gets a
NCCL process group of its own rather than the CPU tests' gloo group.
"""
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, clean_env

PROMPTS = ["\n\nHuman: Repeat: 4 8 1 9\n\nAssistant:", "\n\nHuman: Hello\n\nAssistant:",
           "\n\nHuman: What is 12 + 30?\n\nAssistant:"]
LOGIT_SHARPENING = 8.0
NO_POLICY = "no inference policy"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Hybrid Engine's inference kernels need a CUDA GPU")
@pytest.mark.parametrize("stage", [0, 3])
@pytest.mark.parametrize("model_name", ["tiny/opt", "tiny/llama"])
def test_hybrid_engine_greedy_generation_matches_hugging_face(model_name, stage):
    result = subprocess.run([sys.executable, __file__, model_name, str(stage)], cwd=REPO, env=clean_env(),
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    if outcome.get("skipped"):
        pytest.skip(outcome["skipped"])
    assert outcome["kernels"] == outcome["reference"], (
        f"{model_name} ZeRO-{stage}: Hybrid Engine {outcome['kernels']} "
        f"!= Hugging Face generate {outcome['reference']}")


def compare(model_name: str, stage: int) -> dict:
    """Greedy token ids from the Hybrid Engine's kernels and from Hugging Face generate, same weights."""
    import deepspeed

    from training.utils import distributed
    from training.utils.data.collators import PromptCollator
    from training.utils.data.conversation import encode_chunks, prompt_chunks
    from training.utils.ds_config import get_train_ds_config
    from training.utils.model.build import create_hf_model
    from training.utils.rlhf.engine import has_inference_kernels
    from training.utils.tokenizer import load_tokenizer

    device = distributed.init_distributed()
    torch.manual_seed(0)
    tokenizer = load_tokenizer(model_name)
    config = get_train_ds_config(offload=False, dtype="fp16", stage=stage, train_batch_size=len(PROMPTS),
                                 micro_batch_size=len(PROMPTS), gradient_accumulation_steps=1,
                                 enable_hybrid_engine=True, max_out_tokens=96, device=device.type)
    model = create_hf_model(model_name, tokenizer, ds_config=config, dropout=0.0)
    decoder = model.get_decoder()
    norm = decoder.final_layer_norm if hasattr(decoder, "final_layer_norm") else decoder.norm
    with deepspeed.zero.GatheredParameters([norm.weight], modifier_rank=0, enabled=stage == 3), torch.no_grad():
        norm.weight.mul_(LOGIT_SHARPENING)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    if not has_inference_kernels(engine):
        return {"skipped": f"DeepSpeed has {NO_POLICY} for {type(engine.module).__name__}: step 3 generates with "
                           "Hugging Face generate there, so there is nothing to compare"}
    batch = PromptCollator(tokenizer.pad_token_id)([{"prompt_ids": encode_chunks(tokenizer, prompt_chunks(p))[0]}
                                                     for p in PROMPTS])
    batch = {k: v.to(device) for k, v in batch.items()}
    kwargs = {"max_new_tokens": 24, "do_sample": False, "eos_token_id": tokenizer.eos_token_id,
              "pad_token_id": tokenizer.pad_token_id}
    engine.eval()
    with torch.no_grad():
        kernels = engine.generate(**batch, **kwargs)
    engine.train()
    engine.module.eval()
    with torch.no_grad():
        reference = engine.module.generate(**batch, **kwargs)
    return {"kernels": kernels.tolist(), "reference": reference.tolist()}


if __name__ == "__main__":
    print(json.dumps(compare(sys.argv[1], int(sys.argv[2]))), flush=True)
