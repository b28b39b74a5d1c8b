"""Parity with TRL's DPOTrainer (loss_type=["sigmoid", "sft"], loss_weights=[1, 1]) on single-turn data.

On single-turn data the masks of both agree: TRL trains every completion token, mtdpo the
assistant message and its <end_of_turn>. TRL is fed the same token ids (asserted), with
<end_of_turn> as its EOS; mtdpo's extra trailing "\n" token is untrained and, being last,
cannot change any earlier logit. Both get the same precomputed reference log-probs, so the
comparison is of the objective and its gradient, not of two reference forwards (TRL's
fused LM head computes its no-grad reference log-probs with ~3e-4 noise of its own).
"""

import copy

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer
from trainkit import batch, make_cache, mtdpo_trainer, single_turn_rows, tiny_model

from mtdpo.tokenizer import EMBEDDED_TOKENIZER
from mtdpo.train.loss import sequence_logps

trl = pytest.importorskip("trl")
B = 4


def trl_rows(rows, tok):
    out = []
    for r in rows:
        prompt = tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
        out.append(
            {
                "prompt": prompt.removeprefix(tok.bos_token),  # TRL's tokenizer call adds BOS itself
                "chosen": r["chosen"][0]["content"] + "<end_of_turn>",
                "rejected": r["rejected"][0]["content"] + "<end_of_turn>",
            }
        )
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parity")
    rows = single_turn_rows(8)
    cache = make_cache(tmp, rows)
    reference = tiny_model(seed=0)
    policy = copy.deepcopy(reference)
    with torch.no_grad():  # move the policy away from the reference so rewards are not all zero
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    mb = batch(cache, range(B))
    with torch.no_grad():
        ref_logps, _ = sequence_logps(reference(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits, mb["labels"])
    return tmp, rows, cache, reference, policy, mb, ref_logps


def run_trl(tmp, rows, reference, policy, ref_logps, cache_batch):
    tok = AutoTokenizer.from_pretrained(str(EMBEDDED_TOKENIZER))
    tok.eos_token = "<end_of_turn>"
    args = trl.DPOConfig(
        output_dir=str(tmp / "trl"), loss_type=["sigmoid", "sft"], loss_weights=[1.0, 1.0], beta=0.1,
        per_device_train_batch_size=B, use_cpu=True, report_to="none", max_length=None,
    )  # fmt: skip
    model = copy.deepcopy(policy)
    trainer = trl.DPOTrainer(model=model, ref_model=copy.deepcopy(reference), args=args,
                             train_dataset=Dataset.from_list(trl_rows(rows, tok)), processing_class=tok)  # fmt: skip
    examples = [trainer.train_dataset[i] for i in range(B)]
    for i, ex in enumerate(examples):  # the same tokens, less mtdpo's untrained trailing "\n"
        n = len(ex["prompt_ids"]) + len(ex["chosen_ids"])
        assert ex["prompt_ids"] + ex["chosen_ids"] == cache_batch["input_ids"][i, :n].tolist()
        assert cache_batch["attention_mask"][i].sum().item() == n + 1
    tb = trainer.data_collator(examples)
    tb["ref_chosen_logps"], tb["ref_rejected_logps"] = ref_logps.float().chunk(2)
    trainer.precompute_ref_logps = True
    loss = trainer.compute_loss(model, tb)
    loss.backward()
    return loss.item(), {k: v[-1] for k, v in trainer._metrics["train"].items()}, model


def test_step0_loss_rewards_and_gradients_match_trl(setup):
    tmp, rows, cache, reference, policy, mb, ref_logps = setup
    trl_loss, trl_metrics, trl_model = run_trl(tmp, rows, reference, policy, ref_logps, mb)

    model = copy.deepcopy(policy)
    trainer = mtdpo_trainer(cache, model, None, tmp, beta=0.1, nll_coef=1.0, per_device_train_batch_size=B)
    loss = trainer.compute_loss(model, {**mb, "ref_logps": ref_logps})
    loss.backward()
    ours = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    # TRL logs the summed loss; its parts: sigmoid DPO and sft (= mean chosen-token NLL)
    assert loss.item() == pytest.approx(trl_loss, abs=1e-5)
    assert ours["dpo_loss"] + ours["nll"] == pytest.approx(trl_loss, abs=1e-5)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert ours[name] == pytest.approx(trl_metrics[name], abs=1e-5), name
    assert abs(ours["rewards/margins"]) > 1e-3  # a real comparison, not zeros against zeros
    worst = max((a.grad - b.grad).abs().max().item() for a, b in zip(trl_model.parameters(), model.parameters()))
    assert worst < 1e-4


def test_live_reference_equals_precomputed(setup):
    tmp, _, cache, reference, policy, mb, ref_logps = setup
    live = mtdpo_trainer(cache, copy.deepcopy(policy), reference, tmp)
    loss_live = live.compute_loss(live.model, mb)
    pre = mtdpo_trainer(cache, copy.deepcopy(policy), None, tmp)
    loss_pre = pre.compute_loss(pre.model, {**mb, "ref_logps": ref_logps})
    assert loss_live.item() == pytest.approx(loss_pre.item(), abs=1e-6)
