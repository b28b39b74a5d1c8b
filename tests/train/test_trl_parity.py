"""Parity with TRL's DPOTrainer (loss_type=["sigmoid", "sft"], loss_weights=[1, 1]) on single-turn data.

On single-turn data the masks of both agree: TRL trains every completion token, mtdpo the
assistant message and its <end_of_turn>. TRL is fed the same token ids (asserted), with
<end_of_turn> as its EOS; mtdpo's extra trailing "\n" token is untrained and, being last,
cannot change any earlier logit. Both get the same precomputed reference log-probs, so the
comparison is of the objective and its gradient, not of two reference forwards (TRL's
fused LM head computes its no-grad reference log-probs with ~3e-4 noise of its own).
"""

import copy
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from trainkit import batch, make_cache, mtdpo_trainer, single_turn_rows, tiny_model
from transformers import AutoTokenizer

from mtdpo.assets import EMBEDDED_TOKENIZER
from mtdpo.train.loss import dpo_loss, nll_loss, sequence_logps
from mtdpo.train.plan import Reference

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
        ref_logps, _ = sequence_logps(
            reference(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits, mb["labels"]
        )
    return tmp, rows, cache, reference, policy, mb, ref_logps


def run_trl(tmp, rows, reference, policy, ref_logps, cache_batch):
    tok = AutoTokenizer.from_pretrained(str(EMBEDDED_TOKENIZER))
    tok.eos_token = "<end_of_turn>"
    args = trl.DPOConfig(
        output_dir=str(tmp / "trl"),
        loss_type=["sigmoid", "sft"],
        loss_weights=[1.0, 1.0],
        beta=0.1,
        per_device_train_batch_size=B,
        use_cpu=True,
        report_to="none",
        max_length=None,
    )
    model = copy.deepcopy(policy)
    trainer = trl.DPOTrainer(
        model=model,
        ref_model=copy.deepcopy(reference),
        args=args,
        train_dataset=Dataset.from_list(trl_rows(rows, tok)),
        processing_class=tok,
    )
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
    trainer = mtdpo_trainer(
        cache, model, None, tmp, Reference.COLUMNS, beta=0.1, nll_coef=1.0, per_device_train_batch_size=B
    )
    loss = trainer.compute_loss(model, {**mb, "ref_logps": ref_logps})
    loss.backward()
    ours = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    # TRL logs the summed loss; its parts: sigmoid DPO and sft (= mean chosen-token NLL)
    assert loss.item() == pytest.approx(trl_loss, abs=1e-5)
    assert ours["dpo_loss"] + ours["nll"] == pytest.approx(trl_loss, abs=1e-5)
    for name in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    ):
        assert ours[name] == pytest.approx(trl_metrics[name], abs=1e-5), name
    assert abs(ours["rewards/margins"]) > 1e-3  # a real comparison, not zeros against zeros
    worst = max((a.grad - b.grad).abs().max().item() for a, b in zip(trl_model.parameters(), model.parameters()))
    assert worst < 1e-4


def test_live_reference_equals_precomputed(setup):
    tmp, _, cache, reference, policy, mb, ref_logps = setup
    live = mtdpo_trainer(cache, copy.deepcopy(policy), reference, tmp)
    loss_live = live.compute_loss(live.model, mb)
    pre = mtdpo_trainer(cache, copy.deepcopy(policy), None, tmp, Reference.COLUMNS)
    loss_pre = pre.compute_loss(pre.model, {**mb, "ref_logps": ref_logps})
    assert loss_live.item() == pytest.approx(loss_pre.item(), abs=1e-6)


# ── every loss TRL has, fed the same per-token log-probs ─────────────────────────────────────
# A stand-in for the model hands TRL's DPOTrainer._compute_loss the log-probs we choose, so both
# sides compute their loss (and its gradient) from identical numbers: what is compared is the
# formula, to 1e-6. Run with `-s` to print the differences.
TRL_LOSSES = {  # mtdpo loss_type -> (TRL loss_type, label_smoothing)
    "sigmoid": ("sigmoid", 0.0),
    "ipo": ("ipo", 0.0),
    "hinge": ("hinge", 0.0),
    "robust": ("robust", 0.1),
    "sigmoid_norm": ("sigmoid_norm", 0.0),
    "apo_zero": ("apo_zero", 0.0),
    "bco_pair": ("bco_pair", 0.0),
}
P, T = 6, 12  # pairs, sequence length


class GivenLogProbs(torch.nn.Module):
    """Returns the per-token log-probs it holds, as TRL's fused LM head would."""

    def __init__(self, per_token):
        super().__init__()
        self.per_token = per_token

    def forward(self, **_):
        zeros = torch.zeros_like(self.per_token.detach())
        return SimpleNamespace(log_probs=self.per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


@pytest.fixture(scope="module")
def logprobs():
    """Multi-turn-shaped trained masks (gaps inside the completion), per-token and reference log-probs."""
    g = torch.Generator().manual_seed(7)
    trained = torch.rand(2 * P, T - 1, generator=g) < 0.6
    trained[:, :2] = False  # a prompt
    trained[:, 2] = True  # at least one trained token per sequence
    per_token = -3 * torch.rand(2 * P, T - 1, generator=g, dtype=torch.float64).float() * trained
    ref = per_token.sum(1) + 0.5 * torch.randn(2 * P, generator=g)
    return trained, per_token, ref


@pytest.fixture(scope="module")
def trl_trainer(setup):
    tmp, rows, _, reference, policy, _, _ = setup
    tok = AutoTokenizer.from_pretrained(str(EMBEDDED_TOKENIZER))
    args = trl.DPOConfig(
        output_dir=str(tmp / "trl-losses"), beta=0.1, use_cpu=True, bf16=False, report_to="none", max_length=None
    )
    return trl.DPOTrainer(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(reference),
        args=args,
        train_dataset=Dataset.from_list(trl_rows(rows, tok)),
        processing_class=tok,
    )


def trl_loss(trainer, loss_type, smoothing, trained, per_token, ref):
    trainer.loss_types, trainer.loss_weights, trainer.label_smoothing = [loss_type], [1.0], smoothing
    trainer.precompute_ref_logps = True
    completion_mask = torch.cat([torch.zeros(2 * P, 1, dtype=torch.long), trained.long()], 1)
    inputs = {
        "input_ids": torch.ones(2 * P, T, dtype=torch.long),
        "attention_mask": torch.ones(2 * P, T, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref[:P],
        "ref_rejected_logps": ref[P:],
    }
    return trainer._compute_loss(GivenLogProbs(per_token), inputs, return_outputs=False)


def loss_and_grad(compute, per_token, trained):
    """The loss and its gradient at the trained positions (the only ones with a log-prob)."""
    leaf = per_token.clone().requires_grad_(True)
    loss = compute(leaf)
    loss.backward()
    return loss.detach(), leaf.grad[trained]


def report(name, ours, theirs):
    (loss_a, grad_a), (loss_b, grad_b) = ours, theirs
    diffs = (loss_a - loss_b).abs().item(), (grad_a - grad_b).abs().max().item()
    print(
        f"TRL parity {name:>12}: loss {loss_a.item():.6f}, |loss diff| {diffs[0]:.1e}, max |grad diff| {diffs[1]:.1e}"
    )
    return diffs


@pytest.mark.parametrize("loss_type", TRL_LOSSES)
def test_every_loss_matches_trl_on_the_same_logprobs(trl_trainer, logprobs, loss_type):
    trained, per_token, ref = logprobs
    trl_type, smoothing = TRL_LOSSES[loss_type]
    tokens = trained.sum(1)

    def ours(leaf):
        logps = leaf.sum(1)
        losses, _, _ = dpo_loss(
            logps[:P], logps[P:], ref[:P], ref[P:], 0.1, loss_type, smoothing, tokens[:P], tokens[P:]
        )
        return losses.mean()

    theirs = loss_and_grad(
        lambda leaf: trl_loss(trl_trainer, trl_type, smoothing, trained, leaf, ref), per_token, trained
    )
    loss_diff, grad_diff = report(loss_type, loss_and_grad(ours, per_token, trained), theirs)
    assert loss_diff < 1e-6 and grad_diff < 1e-6
    assert theirs[0].item() != 0 and theirs[1].abs().sum() > 0  # a real comparison


def test_nll_per_token_matches_trl_sft(trl_trainer, logprobs):
    trained, per_token, ref = logprobs
    tokens = trained.sum(1)
    theirs = loss_and_grad(lambda leaf: trl_loss(trl_trainer, "sft", 0.0, trained, leaf, ref), per_token, trained)
    loss_diff, grad_diff = report(
        "nll (token)", loss_and_grad(lambda leaf: nll_loss(leaf.sum(1)[:P], tokens[:P]), per_token, trained), theirs
    )
    assert loss_diff < 1e-6 and grad_diff < 1e-6


@pytest.mark.parametrize("beta, gamma", [(2.0, 0.5), (0.1, 1.0)])
def test_simpo_matches_trl_cpo(logprobs, beta, gamma):
    """TRL has SimPO in its (experimental) CPOTrainer: its cpo_loss on mean token log-probs."""
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    trained, per_token, _ = logprobs
    tokens = trained.sum(1)
    cpo = SimpleNamespace(
        alpha=0.0,
        beta=beta,
        simpo_gamma=gamma,
        label_smoothing=0.0,
        loss_type="simpo",
        accelerator=SimpleNamespace(device=torch.device("cpu")),
    )

    def theirs(leaf):
        mean = leaf.sum(1) / tokens
        return CPOTrainer.cpo_loss(cpo, mean[:P], mean[P:])[0].mean()

    def ours(leaf):
        logps = leaf.sum(1)
        return dpo_loss(logps[:P], logps[P:], None, None, beta, "simpo", 0.0, tokens[:P], tokens[P:], gamma)[0].mean()

    loss_diff, grad_diff = report(
        f"simpo b={beta}", loss_and_grad(ours, per_token, trained), loss_and_grad(theirs, per_token, trained)
    )
    assert loss_diff < 1e-6 and grad_diff < 1e-6
