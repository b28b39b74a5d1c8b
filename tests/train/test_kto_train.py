"""KTO on KTO caches: KL partners, batches, the multi-turn mask in the loss, layouts, the checks
that keep pair losses and KTO losses on their own caches, precompute-ref, LoRA and resume.
(TRL parity: test_kto_parity.py; two ranks: test_kto_distributed.py, slow.)"""

import json
import shutil

import pytest
import torch
from test_train import run_config
from trainkit import (
    kto_batch,
    kto_rows,
    kto_trainer,
    logged,
    loss_metrics_grads,
    make_cache,
    make_kto_cache,
    precompute,
    tiny_model,
    whole_kl_sequences,
)

from mtdpo.cache import KtoRecord, Sequence, open_caches
from mtdpo.errors import UsageError
from mtdpo.train.attention import SEGMENT_ATTENTION
from mtdpo.train.config import MtdpoConfig
from mtdpo.train.forward import fused_sequence_logps
from mtdpo.train.kto_data import KtoCollator, KtoRows, kto_logps
from mtdpo.train.kto_loss import (
    KTO_LOSS_TYPES,
    desirable_nll,
    kl_estimate,
    kl_partner,
    kl_partners,
    kto_mean,
    unpaired_loss,
)
from mtdpo.train.loss import sequence_logps
from mtdpo.train.run import train

X = -100


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_kto_cache(tmp_path_factory.mktemp("kto"), n=8)  # 16 multi-turn rows


def kto_config(cache, tmp_path, **overrides):
    return run_config(cache, tmp_path, **{"loss_type": "kto", "per_device_train_batch_size": 4, **overrides})


# ── partners and batches ──────────────────────────────────────────────────────


@pytest.mark.parametrize("n", [1, 5, 7, 8, 16])
@pytest.mark.parametrize("batch_size", [1, 2, 3, 4, 8])
def test_a_row_s_partner_is_a_function_of_its_position_alone(n, batch_size):
    assert [kl_partner(i, n, batch_size) for i in range(n)] == kl_partners(n, batch_size)


def test_rows_come_with_their_partner_in_any_order(cache):
    data = open_caches([str(cache)])
    rows = KtoRows(data, 3)
    for i in reversed(range(len(rows))):  # any sampler's order: the partner follows the position
        record, partner = rows[i]
        assert record == data.record(i) and partner == data.record(kl_partners(16, 3)[i])
    assert rows[15][1] == rows[15][0]  # the last chunk holds row 15 alone: paired with itself
    assert KtoRows(data, 3, with_partners=False)[4][1] is None


def test_the_collator_by_hand():
    # row 10: prompt [2, 5], completion [6, 7] (desirable); row 11: prompt [2, 8], completion [9] (undesirable)
    a = KtoRecord(Sequence([2, 5, 6, 7], [X, X, 6, 7]), True, 2, 10, reference=(-1.5, -2.5))
    b = KtoRecord(Sequence([2, 8, 9], [X, X, 9]), False, 2, 11, reference=(-3.0, -4.0))
    batch = KtoCollator(0)([(a, b), (b, a)])
    assert batch["policy"]["input_ids"].tolist() == [[2, 5, 6, 7], [2, 8, 9, 0]]
    assert batch["policy"]["labels"].tolist() == [[X, X, 6, 7], [X, X, 9, X]]
    # each row's prompt, then its partner's completion with the partner's labels
    assert batch["kl"]["input_ids"].tolist() == [[2, 5, 9, 0], [2, 8, 6, 7]]
    assert batch["kl"]["labels"].tolist() == [[X, X, 9, X], [X, X, 6, 7]]
    assert batch["kl_index"].tolist() == [0, 1] and batch["kl_same_as_row"].tolist() == [-1, -1]
    assert batch["desirable"].tolist() == [True, False] and batch["rows"].tolist() == [10, 11]
    assert batch["pair_tokens"].item() == 7  # the rows' tokens (the trained ones), not the KL sequences'
    assert batch["chosen_tokens"].item() == 2  # trained tokens of desirable rows: the NLL's divisor
    assert batch["ref_logps"].tolist() == [-1.5, -3.0] and batch["ref_kl_logps"].tolist() == [-2.5, -4.0]
    packed = KtoCollator(0, padding_free=True)([(a, b), (b, a)])
    assert packed["policy"]["input_ids"].tolist() == [[2, 5, 6, 7, 2, 8, 9]]
    assert packed["kl"]["input_ids"].tolist() == [[2, 5, 9, 2, 8, 6, 7]]
    # (shifted position, sequence) of each trained token
    assert packed["kl"]["logp_index"].tolist() == [[1, 4, 5], [0, 1, 1]]
    truncated = KtoCollator(0, max_length=3)([(b, a)])  # a KL sequence longer than the cache allows keeps its start
    assert truncated["kl"]["input_ids"].tolist() == [[2, 8, 6]]


def test_kl_sequences_continue_their_rows_prompts_by_hand():
    """With segment attention a KL sequence is only what follows its prompt, from the prompt's
    last token on (it predicts the completion's first token), attending to the rest of the prompt
    where the rows' sub-batch holds it."""
    a = KtoRecord(Sequence([2, 5, 6, 7], [X, X, 6, 7]), True, 2, 10)
    b = KtoRecord(Sequence([2, 8, 9], [X, X, 9]), False, 2, 11)
    c = KtoRecord(Sequence([3, 4, 5, 8, 7], [X, X, X, 8, 7]), True, 3, 12)  # a longer prompt: [3, 4, 5]
    kl = KtoCollator(0, segments=True)([(a, b), (b, c), (c, a)])["kl"]
    # a's prompt + b's completion [9]; b's prompt + c's [8, 7]; c's prompt + a's [6, 7]
    assert kl["input_ids"].tolist() == [[5, 9, 8, 8, 7, 5, 6, 7]]
    assert kl["labels"].tolist() == [[X, 9, X, 8, 7, X, 6, 7]]
    assert kl["position_ids"].tolist() == [[1, 2, 1, 2, 3, 2, 3, 4]]
    assert kl["segments"].tolist() == [[0, 0, 2, 0, 0], [0, 2, 5, 0, 0], [0, 5, 8, 0, 0]]
    assert kl["earlier_context"] == [[(0, 0, 1)], [(1, 0, 1)], [(2, 0, 2)]]  # padded rows: row k's first tokens
    assert kl["logp_index"].tolist() == [[0, 2, 3, 5, 6], [0, 1, 1, 2, 2]]
    packed = KtoCollator(0, padding_free=True, segments=True)([(a, b), (b, c), (c, a)])["kl"]
    assert packed["earlier_context"] == [[(0, 0, 1)], [(0, 4, 5)], [(0, 7, 9)]]  # the rows end to end
    assert torch.equal(packed["input_ids"], kl["input_ids"])
    # cut at max_length inside the completion, or right after the prompt: nothing left to score
    cut = KtoCollator(0, segments=True, max_length=3)([(c, a), (a, b)])["kl"]
    assert cut["input_ids"].tolist() == [[5, 5, 9]] and cut["labels"].tolist() == [[X, X, 9]]
    assert cut["logp_index"].tolist() == [[1], [1]]


def test_a_kl_sequence_that_is_a_row_of_the_batch_is_not_forwarded_again():
    """Two answers to one prompt, each the other's KL partner: each KL sequence is the other row,
    token for token, so its log-probs are that row's. One is still forwarded (each rank runs the
    KL forward: ZeRO-3 gathers weights collectively)."""
    d = KtoRecord(Sequence([2, 5, 6, 7], [X, X, 6, 7]), True, 2, 10)
    e = KtoRecord(Sequence([2, 5, 9], [X, X, 9]), False, 2, 11)
    f = KtoRecord(Sequence([2, 8, 9], [X, X, 9]), False, 2, 12)
    batch = KtoCollator(0)([(d, e), (e, d)])
    assert batch["kl_same_as_row"].tolist() == [-1, 0] and batch["kl_index"].tolist() == [0]
    assert batch["kl"]["input_ids"].tolist() == [[2, 5, 9]]
    # f's prompt differs from d's: f + d's completion is no row; d + f's completion is e's row
    # (any row of the batch); e + g's completion is none (g, from another batch, is not one)
    g = KtoRecord(Sequence([2, 8, 4], [X, X, 4]), False, 2, 99)
    batch = KtoCollator(0, segments=True)([(f, d), (d, f), (e, g)])
    assert batch["kl_same_as_row"].tolist() == [-1, 2, -1] and batch["kl_index"].tolist() == [0, 2]
    assert batch["kl"]["input_ids"].tolist() == [[8, 6, 7, 5, 4]]
    assert batch["kl"]["earlier_context"] == [[(0, 0, 1)], [(2, 0, 1)]]


@pytest.mark.parametrize("max_length", [None, 90])
@pytest.mark.parametrize("layout", [{}, {"padding_free": True}, {"prefix_forest": True}])
def test_kl_continuations_give_the_whole_kl_sequences_log_probs(cache, tmp_path, layout, max_length):
    """The KL log-probs from continuations of the rows' keys and values, and those taken from the
    rows a KL sequence repeats, equal those of the whole KL sequences forwarded alone (fp32),
    multi-turn rows, cut ones included, in every layout."""
    model = tiny_model()
    model.set_attn_implementation(SEGMENT_ATTENTION)
    trainer = kto_trainer(cache, model, None, tmp_path, **layout)
    trainer.data_collator.max_length = max_length  # 90: shorter than the KL sequences
    items = [trainer.train_dataset[i] for i in range(6)]
    whole = whole_kl_sequences(trainer, range(6), max_length)
    batch = trainer.data_collator(items)
    if max_length is None:
        # rows 2k and 2k + 1 share a prompt: 1, 3 and 5 borrow 0's, 2's, 4's completion, their
        # KL sequences are those rows; 0, 2 and 4 continue their prompts (not forwarded again)
        assert batch["kl_same_as_row"].tolist() == [-1, 0, -1, 2, -1, 4]
        assert batch["kl"]["input_ids"].numel() < whole["attention_mask"][0::2].sum()
    else:  # cut: no KL sequence is a row, each continues its prompt
        assert (whole["attention_mask"].sum(1) == 90).all() and batch["kl_index"].tolist() == list(range(6))
        assert batch["kl"]["input_ids"].numel() < whole["attention_mask"].sum()
    with torch.no_grad():
        expected = fused_sequence_logps(trainer.model, whole, 6)[0]
        logps, tokens, kl_logps = kto_logps(trainer.model, batch)
        rows = fused_sequence_logps(trainer.model, KtoCollator(0)(items)["policy"], 6)[0]
    # sums of ~90 fp32 log-probs of ~ -5 each, in another order: equal to 1e-6 relative
    torch.testing.assert_close(kl_logps, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(logps, rows, rtol=1e-6, atol=0)


# ── the multi-turn mask in the loss ───────────────────────────────────────────


@pytest.mark.parametrize("nll_coef", [0.0, 1.0])
@pytest.mark.parametrize("loss_type", KTO_LOSS_TYPES)
def test_untrained_positions_leave_the_kto_loss_bit_identical(cache, loss_type, nll_coef):
    """Logits that predict user turns, tool output, headers or the prompt (label -100), in the
    rows and in their KL sequences, never reach the loss nor get a gradient."""
    data = open_caches([str(cache)])
    rows = KtoRows(data, 4)
    batch = KtoCollator(0)([rows[i] for i in range(4)])
    labels, kl_labels, desirable = batch["policy"]["labels"], batch["kl"]["labels"], batch["desirable"]
    g = torch.Generator().manual_seed(1)

    def draw(like):
        return torch.randn(*like.shape, 64, generator=g)

    logits = draw(labels).requires_grad_(True)
    ref, kl_logits, ref_kl = draw(labels), draw(kl_labels), draw(kl_labels)
    # ids below 64 for these logits: the comparison is of which positions count, not of the vocabulary
    labels, kl_labels = labels.where(labels == X, labels % 64), kl_labels.where(kl_labels == X, kl_labels % 64)

    def objective(policy_logits, ref_logits, policy_kl, reference_kl):
        logps, tokens = sequence_logps(policy_logits, labels)
        ref_logps = sequence_logps(ref_logits, labels)[0]
        kl = kl_estimate(sequence_logps(policy_kl, kl_labels)[0], sequence_logps(reference_kl, kl_labels)[0])
        losses, _ = unpaired_loss(loss_type, logps, ref_logps, desirable, kl, 0.1)
        return kto_mean(losses) + nll_coef * desirable_nll(logps, tokens, desirable)

    loss = objective(logits, ref, kl_logits, ref_kl)
    loss.backward()

    def untrained(lab):
        return torch.cat([lab[:, 1:] == X, torch.ones(len(lab), 1, dtype=torch.bool)], 1)[..., None]

    gaps = [(row[row != X].numel(), (row == X).nonzero().max().item()) for row in labels[:, 1:]]
    assert all(trained > 0 for trained, _ in gaps)
    # multi-turn: untrained stretches (user turns, tool output) between trained turns
    inside = [((row[:-1] != X) & (row[1:] == X)).sum().item() for row in labels]
    assert max(inside) >= 2
    noise = 50 * torch.randn(logits.shape, generator=g)
    kl_noise = 50 * torch.randn(kl_logits.shape, generator=g)
    with torch.no_grad():
        perturbed = objective(
            logits + noise * untrained(labels),
            ref - noise * untrained(labels),
            kl_logits + kl_noise * untrained(kl_labels),
            ref_kl - kl_noise * untrained(kl_labels),
        )
    assert torch.equal(perturbed, loss.detach())
    assert torch.all(logits.grad[untrained(labels).expand_as(logits)] == 0)
    assert logits.grad.abs().sum() > 0


def noisier(model):
    """The model with noise on every weight: near-uniform distributions spread, so it gives the
    completions lower log-probs than the model did and the KL mean is > 0 (tests/train/test_kto_parity.py)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def laid_out(cache, tmp_path, rows, **layout):
    """(trainer, inputs, loss, metrics, gradients) of one batch of `rows` laid out as `layout`
    says, with a fresh tiny policy and a noisier reference (kl > 0: not clamped) on segment attention."""
    model, ref = tiny_model(), noisier(tiny_model())
    for m in (model, ref):
        m.set_attn_implementation(SEGMENT_ATTENTION)
    trainer = kto_trainer(cache, model, ref, tmp_path, nll_coef=1.0, **layout)
    inputs = kto_batch(trainer, rows)
    return trainer, inputs, *loss_metrics_grads(trainer, inputs)


def assert_same_step(a, b):
    """Two `laid_out` results: the same loss, KL, NLL, log-probs and gradients (fp32)."""
    (_, _, loss_a, metrics_a, grads_a), (_, _, loss_b, metrics_b, grads_b) = a, b
    assert loss_b == pytest.approx(loss_a, abs=1e-5)
    for name in ("kl", "nll", "logps/chosen", "logps/rejected"):
        assert metrics_b[name] == pytest.approx(metrics_a[name], rel=1e-5), name
    assert metrics_a["kl"] > 0
    assert max((x - y).abs().max().item() for x, y in zip(grads_a, grads_b)) < 1e-5


def test_padding_free_batches_equal_padded_ones(cache, tmp_path):
    padded, packed = (laid_out(cache, tmp_path, range(4), padding_free=flag) for flag in (False, True))
    assert padded[0].data_collator.padding_free is False and packed[0].data_collator.padding_free is True
    assert_same_step(padded, packed)
    # rewards are beta x differences of log-probs summed in another order (fp32 rounding of sums ~ -300)
    for name in ("rewards/chosen", "rewards/rejected"):
        assert packed[3][name] == pytest.approx(padded[3][name], abs=1e-4), name


def test_nll_on_desirable_rows_by_the_count_of_their_trained_tokens(cache, tmp_path):
    trainer = kto_trainer(cache, tiny_model(), tiny_model(), tmp_path, nll_coef=1.0)
    inputs = kto_batch(trainer, range(4))
    loss, metrics = trainer.batch_loss(trainer.model, inputs)
    from mtdpo.train.forward import fused_sequence_logps

    with torch.no_grad():
        logps, tokens = fused_sequence_logps(trainer.model, inputs["policy"])
    desirable = inputs["desirable"]
    assert metrics["nll"] == pytest.approx(-logps[desirable].sum().item() / tokens[desirable].sum().item(), rel=1e-6)
    assert inputs["chosen_tokens"].item() == tokens[desirable].sum().item()
    # the policy is its own reference: rewards 0, kl 0, every row's loss 1 - sigmoid(0) = 0.5
    assert metrics["kl"] == 0 and metrics["rewards/margins"] == 0
    assert metrics["kto_loss"] == pytest.approx(0.5) and loss.item() == pytest.approx(0.5 + metrics["nll"])


# ── the checks ────────────────────────────────────────────────────────────────


def test_kto_losses_go_on_kto_caches_and_pair_losses_on_pairs(cache, tmp_path):
    pairs = make_cache(tmp_path, n=4)
    with pytest.raises(UsageError, match=r"is a KTO cache \(unpaired rows\): --loss-type sigmoid needs pairs"):
        train(kto_config(cache, tmp_path, loss_type="sigmoid"))
    with pytest.raises(UsageError, match=r"--loss-type kto needs a KTO cache .* is a pair cache"):
        train(run_config(pairs, tmp_path, loss_type="kto"))
    with pytest.raises(UsageError, match=rf"{tmp_path / 'cache'} is a pair cache and {cache} a KTO cache: train"):
        train(run_config(pairs, tmp_path, data=[str(pairs), str(cache)]))
    with pytest.raises(UsageError, match="--eval-data .* is a pair cache and --data .* a KTO cache"):
        train(kto_config(cache, tmp_path, eval_data=str(pairs)))
    with pytest.raises(UsageError, match="--prefix-sharing lays out pairs"):
        train(kto_config(cache, tmp_path, prefix_sharing=True))
    with pytest.raises(UsageError, match="--nll-norm sequence is for pairs"):
        train(kto_config(cache, tmp_path, nll_norm="sequence"))
    with pytest.raises(UsageError, match="--desirable-weight 0.0: a KTO class weight is a positive number"):
        kto_config(cache, tmp_path, desirable_weight=0.0)
    with pytest.raises(UsageError, match="--loss-type kto needs --per-device-train-batch-size 2 or more"):
        kto_config(cache, tmp_path, per_device_train_batch_size=1)
    kto_config(cache, tmp_path, per_device_train_batch_size=1, loss_type="apo_zero_unpaired")  # no KL: fine
    with pytest.raises(UsageError, match="unknown --loss-type 'kto_pair'"):
        kto_config(cache, tmp_path, loss_type="kto_pair")


def test_the_nll_default_follows_the_loss(tmp_path):
    base = dict(data=["x"], output_dir=str(tmp_path), use_cpu=True)
    assert MtdpoConfig(**base).nll_coef == 1.0  # the multi-turn DPO recipe
    assert MtdpoConfig(**base, loss_type="kto").nll_coef == 0.0  # M-KTO and TRL: no NLL
    assert MtdpoConfig(**base, loss_type="apo_zero_unpaired").nll_coef == 0.0
    assert MtdpoConfig(**base, loss_type="kto", nll_coef=0.5).nll_coef == 0.5


# ── runs ──────────────────────────────────────────────────────────────────────


def test_a_kto_run_logs_what_trl_logs_and_says_when_the_weights_are_off(tmp_path, capsys):
    rows = [dict(r, label=r["label"] or k % 4 == 1) for k, r in enumerate(kto_rows(6))]  # 9 desirable, 3 not
    cache = make_cache(tmp_path, rows, name="lopsided")
    counts = json.loads((cache / "manifest.json").read_text())["counts"]
    assert (counts["desirable"], counts["undesirable"]) == (9, 3)
    train(kto_config(cache, tmp_path, max_steps=3))
    out = capsys.readouterr().out
    assert "KTO weights: 9 desirable and 3 undesirable rows" in out
    assert "Set EITHER desirable_weight in [0.33, 0.44] OR undesirable_weight in [2.26, 3]" in out
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = lines[0]
    assert {"loss", "kto_loss", "nll", "kl", "rewards/chosen", "logps/chosen", "tokens_per_second"} <= set(first)
    assert first["nll"] == 0 and first["loss"] == pytest.approx(first["kto_loss"])  # no NLL by default
    assert "kto " in out and "  kl " in out
    train(kto_config(cache, tmp_path, max_steps=1, desirable_weight=0.4, output_dir=str(tmp_path / "weighted")))
    assert "KTO weights" not in capsys.readouterr().out


def test_precomputed_reference_gives_the_same_losses_and_fixes_the_batch_size(cache, tmp_path):
    live = tmp_path / "live"
    train(kto_config(cache, tmp_path, output_dir=str(live), seed=42, nll_coef=1.0))
    cached = tmp_path / "cached"
    shutil.copytree(cache, cached)
    precompute(cached, per_device_train_batch_size=4)  # the seed-42 tiny model: the run's start and reference
    manifest = json.loads((cached / "manifest.json").read_text())
    assert (
        manifest["reference"]["columns"] == ["ref_logp", "ref_kl_logp"] and manifest["reference"]["kl_batch_size"] == 4
    )
    pre = tmp_path / "pre"
    train(kto_config(cached, tmp_path, output_dir=str(pre), seed=42, nll_coef=1.0))
    for key in ("loss", "kl"):
        for step, value in logged(live, key).items():
            assert logged(pre, key)[step] == pytest.approx(value, rel=1e-6, abs=1e-5)
    with pytest.raises(UsageError, match=r"paired in chunks of 4 rows .* this run pairs in chunks of 2: re-run"):
        train(kto_config(cached, tmp_path, per_device_train_batch_size=2))
    train(kto_config(cached, tmp_path, per_device_train_batch_size=2, loss_type="apo_zero_unpaired", max_steps=1))
    odd = tmp_path / "odd"  # 6 rows: a second cache joined after it would start inside a chunk of 4
    shutil.copytree(make_kto_cache(tmp_path, n=3, name="kto-odd"), odd)
    precompute(odd, per_device_train_batch_size=4)
    with pytest.raises(UsageError, match=r"starts at row 6 of the joined caches, inside a chunk of 4"):
        train(kto_config(odd, tmp_path, data=[str(odd), str(cached)]))


def test_lora_kto_starts_from_a_tie_and_trains_only_the_adapters(cache, tmp_path):
    trainer = train(kto_config(cache, tmp_path, lora_r=4, lora_alpha=8, learning_rate=5e-3, max_steps=3))
    assert trainer.plan.reference.name == "ADAPTERS_OFF" and trainer.ref_model is None
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["kl"] == 0 and first["rewards/margins"] == 0  # adapters start at zero: policy = reference
    assert {n for n, p in trainer.model.named_parameters() if p.requires_grad} and all(
        "lora_" in n for n, p in trainer.model.named_parameters() if p.requires_grad
    )
    assert logged(tmp_path / "run", "kl")[3] != 0  # the adapters moved the policy


def test_resume_replays_the_same_kto_steps(cache, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    options = dict(max_steps=6, train_sampling_strategy="group_by_length", per_device_train_batch_size=2)
    train(kto_config(cache, tmp_path, output_dir=str(straight), save_strategy="steps", save_steps=3, **options))
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    train(kto_config(cache, tmp_path, output_dir=str(resumed), resume_from_checkpoint="auto", **options))
    for key in ("loss", "kl", "rewards/chosen"):
        before, after = logged(straight, key), logged(resumed, key)
        assert sorted(after) == [4, 5, 6]
        for step in (4, 5, 6):
            assert after[step] == pytest.approx(before[step], abs=1e-6), key
    assert len({round(v, 5) for v in logged(straight, "loss").values()}) > 1


# ── the prefix forest ─────────────────────────────────────────────────────────


def test_a_forest_of_kto_rows_gives_the_padded_losses_and_gradients(cache, tmp_path):
    """Rows 2k and 2k + 1 answer one prompt (kto_rows): in a forest each prompt is computed once
    for the rows, and their KL sequences continue it; the losses and gradients are the padded ones."""
    padded, forest = (laid_out(cache, tmp_path, range(6), prefix_forest=flag) for flag in (False, True))
    assert padded[0].data_collator.prefix_forest is False and forest[0].data_collator.prefix_forest is True
    assert_same_step(padded, forest)
    rows = forest[1]["policy"]["input_ids"]  # one row, each shared prompt once: fewer tokens than the rows hold
    assert rows.shape[0] == 1 and rows.shape[1] < padded[1]["policy"]["attention_mask"].sum().item()
    # the same continuations in both, attending to where each layout holds the prompt
    assert torch.equal(forest[1]["kl"]["input_ids"], padded[1]["kl"]["input_ids"])
    assert forest[1]["kl"]["earlier_context"] != padded[1]["kl"]["earlier_context"]


def test_group_by_prompt_puts_a_problem_s_kto_rows_in_one_micro_batch(cache, tmp_path):
    data = open_caches([str(cache)])
    keys, suffix, prompt = KtoRows(data, 4).prompts()
    assert (keys[0::2] == keys[1::2]).all() and len(set(keys.tolist())) == len(keys) // 2  # pairs of rows share one
    assert (suffix + prompt).tolist() == data.lengths().tolist()
    model = tiny_model()
    model.set_attn_implementation(SEGMENT_ATTENTION)
    sampler = kto_trainer(cache, model, None, tmp_path, prefix_forest=True)._get_train_sampler()
    assert sorted(i for batch in sampler.batches for i in batch) == list(range(len(keys)))
    for batch in sampler.batches:  # groups of two rows, four rows a micro-batch: every group whole
        assert len(batch) <= 4 and all(keys[i] in keys[[j for j in batch if j != i]] for i in batch)
    run = tmp_path / "forest"
    train(
        kto_config(cache, tmp_path, output_dir=str(run), prefix_forest=True, max_steps=2, per_device_train_batch_size=4)
    )
    assert sorted(logged(run, "loss")) == [1, 2]
