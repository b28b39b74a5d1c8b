"""TRL's KTOTrainer as the reference for mtdpo's KTO: one forward and backward on single-turn rows.

`trl_kto_step` runs TRL 1.x's own `compute_loss` on the first batch its trainer would train on
(sequential sampling, `batch_size` rows) and returns the loss, the KL reference point, the
per-row rewards and the gradient of one parameter, so that mtdpo's KTO trainer can be asserted
to give the same numbers. Everything in fp32 (`bf16=False`), the tiny random Gemma of
tests/trainkit.py and the embedded tokenizer, as the DPO parity test (tests/train/test_trl_parity.py).

TRL computes the rewards inside `_compute_loss` and logs only their means; `locals_at_return`
reads the per-row values from that function's frame as it returns.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoTokenizer

from mtdpo.assets import EMBEDDED_TOKENIZER

END_OF_TURN = "<end_of_turn>"
PARAMETER = "model.layers.0.mlp.down_proj.weight"  # the parameter whose gradient is returned


def single_turn_kto_rows(n: int) -> list[dict]:
    """Conversational unpaired rows (TRL's unpaired-preference format, the input of a KTO cache):
    alternately a right (desirable) and a wrong (undesirable) product."""
    rows = []
    for i in range(n):
        right = i % 2 == 0
        answer = f"It is {(i + 3) * (i + 7)}." if right else f"Maybe {(i + 3) * (i + 7) + 1}, I think so."
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"What is {i + 3} times {i + 7}?"}],
                "completion": [{"role": "assistant", "content": answer}],
                "label": right,
            }
        )
    return rows


def as_trl_text(rows: list[dict], tok=None) -> list[dict]:
    """{"prompt": str, "completion": str, "label": bool}: the prompt rendered with its generation
    prompt, less BOS (TRL's tokenizer call adds it), the completion as the model generates it,
    through <end_of_turn> (the EOS TRL is given, so it appends none). These are the tokens
    mtdpo's masking trains, less the untrained "\\n" the template writes after the marker."""
    tok = tok or kto_tokenizer()
    out = []
    for r in rows:
        prompt = tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
        out.append(
            {
                "prompt": prompt.removeprefix(tok.bos_token),
                "completion": r["completion"][0]["content"] + END_OF_TURN,
                "label": r["label"],
            }
        )
    return out


def kto_tokenizer():
    tok = AutoTokenizer.from_pretrained(str(EMBEDDED_TOKENIZER))
    tok.eos_token = END_OF_TURN
    return tok


def trl_kto_trainer(rows: list[dict], policy, reference, output_dir: Path, batch_size: int = 4, **config):
    """A TRL KTOTrainer on text rows ({"prompt": str, "completion": str, "label": bool}), with
    copies of the given models; `config` overrides KTOConfig (beta, loss_type, weights...)."""
    import trl

    defaults = dict(
        output_dir=str(output_dir), per_device_train_batch_size=batch_size, use_cpu=True, bf16=False, report_to="none",
        max_length=None, activation_checkpointing=False, beta=0.1,
    )  # fmt: skip
    args = trl.KTOConfig(**{**defaults, **config})
    ref = None if reference is None else copy.deepcopy(reference)
    return trl.KTOTrainer(
        model=copy.deepcopy(policy),
        ref_model=ref,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=kto_tokenizer(),
    )


@dataclass
class KTOReference:
    loss: float
    kl: float  # the reference point z0 TRL used (0.0 for apo_zero_unpaired)
    rewards: torch.Tensor  # [B] beta * (log pi - log pi_ref), in row order
    desirable: torch.Tensor  # [B] bool
    grad: torch.Tensor  # d loss / d PARAMETER
    policy_kl_logps: torch.Tensor | None  # [B] summed log-probs of the mismatched sequences (None without KL)
    ref_kl_logps: torch.Tensor | None
    examples: list[dict]  # TRL's tokenized rows of the batch: prompt_ids, completion_ids, KL_completion_ids, label
    metrics: dict[str, float] = field(default_factory=dict)  # what TRL logs for the step


def trl_kto_step(
    rows: list[dict], policy, reference, output_dir: Path, batch_size: int = 4, parameter: str = PARAMETER, **config
) -> KTOReference:
    """TRL's loss, KL, per-row rewards and the gradient of `parameter` on its first batch of
    `rows` (text rows, see `trl_kto_trainer`): one forward and backward, no optimizer step."""
    import trl

    trainer = trl_kto_trainer(rows, policy, reference, output_dir, batch_size, **config)
    examples = [trainer.train_dataset[i] for i in range(batch_size)]  # its sequential sampler's first batch
    batch = trainer.data_collator(examples)
    trainer.model.train()
    loss, frame = locals_at_return(trl.KTOTrainer._compute_loss, trainer.compute_loss, trainer.model, batch)
    loss.backward()
    desirable = batch["label"].bool()
    rewards = torch.zeros(len(desirable))
    rewards[frame["chosen_idx"]] = frame["chosen_rewards"].float()
    rewards[frame["rejected_idx"]] = frame["rejected_rewards"].float()
    return KTOReference(
        loss=loss.item(),
        kl=frame["kl"].item(),
        rewards=rewards,
        desirable=desirable,
        grad=trainer.model.get_parameter(parameter).grad.detach().clone(),
        policy_kl_logps=frame["KL_logps"],
        ref_kl_logps=frame["ref_KL_logps"],
        examples=examples,
        metrics={k: v[-1] for k, v in trainer._metrics["train"].items()},
    )


def locals_at_return(function, call, *args, **kwargs):
    """Run call(*args, **kwargs) and return its result and the local variables of `function`
    (a plain function, or a method taken from its class) at its last return."""
    code, frame_locals = function.__code__, {}
    previous = sys.getprofile()

    def profile(frame, event, arg):
        if event == "return" and frame.f_code is code:
            frame_locals.update(frame.f_locals)
        if previous is not None:
            previous(frame, event, arg)

    sys.setprofile(profile)
    try:
        result = call(*args, **kwargs)
    finally:
        sys.setprofile(previous)
    if not frame_locals:
        raise RuntimeError(f"{function.__qualname__} was not called")
    return result, frame_locals
