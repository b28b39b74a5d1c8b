"""Multi-turn KTO on a KTO cache: the DPO trainer with a KTO batch loss.

Everything else is the DPO trainer's (mtdpo/train/trainer.py): the reference (a frozen copy,
--ref-model, the policy with its LoRA adapters off, or precomputed columns), the step-level
normalisation, resume, DDP / ZeRO / FSDP, checkpoints and logs. Per micro-batch, as TRL's
KTOTrainer (1.16, `_compute_loss`; tests/train/test_kto_parity.py compares the two):

1. the policy's and the reference's log-probs of the rows (every trained assistant turn), and of
   the KL sequences, without gradient (each row's prompt + its KL partner's completion:
   kto_data.py, which computes a prompt once for its row and its KL sequence; TRL forwards the
   KL sequences first, a different order of the same numbers);
2. the reference point z0 = kl_estimate: their mean difference on this rank, averaged over ranks
   (`accelerator.gather`), clamped at 0;
3. kto_loss (or apo_zero_unpaired, which needs no KL batch) per row, with the class weights;
   the loss is their mean over the optimizer step's rows (TRL: over the micro-batch; the same
   for one micro-batch on one rank), plus nll_coef x the NLL of the desirable rows (off by
   default: M-KTO and TRL have none).
"""

from __future__ import annotations

import torch

from mtdpo.train.kto_data import kto_logps
from mtdpo.train.kto_loss import NEEDS_KL, desirable_nll, kl_estimate, kto_mean, unpaired_loss
from mtdpo.train.plan import Reference
from mtdpo.train.trainer import MultiTurnDPOTrainer


class MultiTurnKTOTrainer(MultiTurnDPOTrainer):
    """train_dataset / eval_dataset are `KtoRows`, the collator a `kto_data.KtoCollator`."""

    def _sequences(self, inputs) -> int:
        return len(inputs["rows"])  # pair_tokens counts the rows' tokens only (kto_data.py)

    @property
    def needs_kl(self) -> bool:
        return self.args.loss_type in NEEDS_KL

    def batch_loss(self, model, inputs, reference=None, step_counts=None) -> tuple[torch.Tensor, dict[str, float]]:
        reference = reference or self.plan.reference
        logps, tokens, policy_kl = kto_logps(model, inputs, self.needs_kl)
        ref_logps, ref_kl = self.reference_logps(model, inputs, reference)
        kl = kl_estimate(policy_kl, ref_kl, gather=self.accelerator.gather) if self.needs_kl else None
        return self.kto_objective(logps, ref_logps, tokens, inputs["desirable"], kl, step_counts)

    def reference_logps(self, model, inputs, reference: Reference) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The reference's summed log-probs of the rows and of their KL sequences (None without KL)."""
        if reference is Reference.COLUMNS:
            return inputs["ref_logps"], inputs.get("ref_kl_logps") if self.needs_kl else None
        with torch.no_grad(), self.reference_model(model, reference) as frozen:
            logps, _, kl_logps = kto_logps(frozen, inputs, self.needs_kl)
        return logps, kl_logps

    def kto_objective(
        self, logps, ref_logps, tokens, desirable, kl, step_counts=None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """[B] summed log-probs of the rows -> loss and logged metrics.

        `step_counts` = [rows, trained tokens of desirable rows] of the whole optimizer step (all
        micro-batches, all ranks): the loss is then this micro-batch's share of the step's mean
        over rows (and of its NLL over desirable tokens). None (eval, `--loss-scope
        micro_batch`): this micro-batch of every rank, which Trainer averages over accumulation.
        """
        args = self.args
        losses, rewards = unpaired_loss(
            args.loss_type,
            logps,
            ref_logps,
            desirable,
            kl,
            args.beta,
            args.desirable_weight,
            args.undesirable_weight,
        )
        if step_counts is None:
            micro_batches = 1
            counts = torch.tensor([len(logps), int(tokens[desirable].sum())], device=logps.device)
            step_counts = self.accelerator.reduce(counts, reduction="sum")
        else:
            micro_batches = self.current_gradient_accumulation_steps
        rows, desirable_tokens = step_counts
        kto = kto_mean(losses, rows)
        nll = desirable_nll(logps, tokens, desirable, desirable_tokens) if args.nll_coef else logps.sum() * 0
        # DDP (and ZeRO, FSDP) average the gradient over ranks: x world size makes it their sum.
        loss = (kto + args.nll_coef * nll) * self.accelerator.num_processes
        kto, nll = kto.detach() * micro_batches, nll.detach() * micro_batches
        return loss, self.kto_metrics(kto, nll, kl, logps.detach(), rewards, desirable)

    def kto_metrics(self, kto, nll, kl, logps, rewards, desirable) -> dict[str, float]:
        """What TRL's KTOTrainer logs (kl, rewards and logps of the desirable rows as
        "chosen", of the undesirable ones as "rejected", their margin), sums over every rank
        divided by the rows of each kind; plus the loss terms."""
        gather = self.accelerator.gather_for_metrics
        metrics = {"kto_loss": gather(kto).sum().item(), "nll": gather(nll).sum().item()}
        metrics["kl"] = 0.0 if kl is None else kl.item()  # TRL logs 0 for a loss without a KL batch
        counts = {}
        for name, mask in (("chosen", desirable), ("rejected", ~desirable)):
            counts[name] = gather(mask.sum()).sum().item()
            if counts[name]:
                metrics[f"rewards/{name}"] = gather(rewards[mask].nansum()).nansum().item() / counts[name]
                metrics[f"logps/{name}"] = gather(logps[mask].nansum()).nansum().item() / counts[name]
        if counts["chosen"] and counts["rejected"]:
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        return metrics


def label_counts(cache) -> tuple[int, int]:
    """(desirable, undesirable) rows of an OpenCache, from its manifests' counts."""
    return tuple(sum(m.counts.get(name, 0) for m in cache.manifests) for name in ("desirable", "undesirable"))


def kto_run_parts(config, plan, train_data, eval_data) -> dict:
    """The trainer class, datasets and collator `run.train` gives a KTO cache, and what the run
    says at start about the class weights (`kto_loss.weight_advice`: the KTO paper's range)."""
    from mtdpo.train.kto_data import KtoCollator, KtoRows
    from mtdpo.train.kto_loss import weight_advice

    needs_kl = config.loss_type in NEEDS_KL
    batch = config.per_device_train_batch_size  # TRL pairs eval rows in chunks of the train batch too
    collator = KtoCollator(
        train_data.manifest.tokenizer.pad_token_id or 0,
        padding_free=plan.layout.padding_free,
        segments=plan.layout.collator_options()["segments"],
        max_length=train_data.manifest.max_length,
        prefix_forest=plan.layout.prefix_forest,
    )
    return {
        "trainer": MultiTurnKTOTrainer,
        "train_dataset": KtoRows(train_data, batch, needs_kl),
        "eval_dataset": None if eval_data is None else KtoRows(eval_data, batch, needs_kl),
        "collator": collator,
        "advice": weight_advice(*label_counts(train_data), config.desirable_weight, config.undesirable_weight),
    }
