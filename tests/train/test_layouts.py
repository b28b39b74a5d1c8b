"""Batch layouts (padded, packed, prefix-shared), segment attention, precision and MFU."""

import pytest
import torch
from trainkit import loss_metrics_grads, make_cache, mtdpo_trainer, tiny_model

from mtdpo.cache import PairRecord
from mtdpo.errors import UsageError
from mtdpo.synthetic import make_pairs
from mtdpo.train.attention import SEGMENT_ATTENTION, KeptKeys, dense_segment_mask, segment_attention
from mtdpo.train.data import PairCollator, shared_pair
from mtdpo.train.layout import choose_layout

X = -100


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("layouts"), n=24)


def test_a_shared_pair_is_prompt_chosen_then_the_rejected_branch():
    # prompt 10 11 12 (its last token trained on both sides), chosen 13 14, rejected 15
    row = dict(
        chosen_input_ids=[10, 11, 12, 13, 14],
        chosen_labels=[X, X, 12, 13, 14],
        rejected_input_ids=[10, 11, 12, 15],
        rejected_labels=[X, X, 12, 15],
        prompt_len=3,
        row=0,
    )
    pair = shared_pair(PairRecord.from_row(row))
    # the branch re-reads the prompt's last token (12) at its position (2), then rejected's own tokens
    assert pair["input_ids"] == [10, 11, 12, 13, 14, 12, 15]
    assert pair["position_ids"] == [0, 1, 2, 3, 4, 2, 3]
    assert pair["labels"] == [X, X, 12, 13, 14, X, 15]
    # trunk: causal over 0..4; branch 5..6: causal over itself plus the prompt before its copy (0..1)
    assert pair["segments"] == [(0, 5, 0, 0), (5, 7, 0, 2)]
    # token 12 counts once for each side, 13 and 14 for chosen, 15 (predicted from the copy) for rejected
    assert pair["score"] == [(2, 0), (2, 1), (3, 0), (4, 0), (6, 1)]
    mask = dense_segment_mask([[0, *s] for s in pair["segments"]], 1, 7)[0, 0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0, 1, 0],  # the copy of 12 sees 10 11 and itself: the context of the original 12
        [1, 1, 0, 0, 0, 1, 1],  # 15 never sees chosen's 13 14
    ]


def test_a_shared_batch_scores_each_sequence_once():
    rows = [
        dict(
            chosen_input_ids=[1, 2, 3],
            chosen_labels=[X, X, 3],
            rejected_input_ids=[1, 2, 4, 5],
            rejected_labels=[X, X, 4, 5],
            prompt_len=2,
            row=7,
        ),
        dict(
            chosen_input_ids=[1, 6],
            chosen_labels=[X, 6],
            rejected_input_ids=[1, 8],
            rejected_labels=[X, 8],
            prompt_len=1,
            row=9,
        ),
    ]
    batch = PairCollator(0, prefix_sharing=True)(rows)
    # pair 0: 1 2 3 | 2 4 5 ; pair 1 (prompt of one token: the branch starts at it, no context): 1 6 | 1 8
    assert batch["input_ids"].tolist() == [[1, 2, 3, 2, 4, 5, 1, 6, 1, 8]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 1, 2, 3, 0, 1, 0, 1]]
    assert batch["segments"].tolist() == [[0, 0, 3, 0, 0], [0, 3, 6, 0, 1], [0, 6, 8, 6, 6], [0, 8, 10, 6, 6]]
    # (shifted position, sequence): chosen rows are 0, 1 and rejected rows 2, 3
    assert batch["logp_index"].tolist() == [[1, 3, 4, 6, 8], [0, 2, 2, 1, 3]]
    assert batch["pair_tokens"].item() == 3 + 4 + 2 + 2 and batch["rows"].tolist() == [7, 9]


def test_segment_attention_equals_attention_under_the_dense_mask():
    torch.manual_seed(0)
    heads, kv_heads, dim, length = 4, 2, 8, 12
    segments = [[0, 0, 5, 0, 0], [0, 5, 9, 0, 3], [0, 9, 12, 9, 9], [1, 0, 7, 0, 0]]  # row 1 is padded after 7
    q = torch.randn(2, heads, length, dim)
    k, v = torch.randn(2, kv_heads, length, dim), torch.randn(2, kv_heads, length, dim)
    module = torch.nn.Module()
    module.num_key_value_groups = heads // kv_heads
    out, _ = segment_attention(module, q, k, v, None, scaling=dim**-0.5, segments=segments)
    mask = dense_segment_mask(segments, 2, length)
    scores = q @ k.repeat_interleave(2, 1).transpose(-1, -2) * dim**-0.5
    expected = (
        scores.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num() @ v.repeat_interleave(2, 1)
    ).transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert out[1, 7:].abs().sum() == 0  # padding is not computed


def test_segments_attend_to_the_keys_an_earlier_forward_kept():
    """A forward keeps its keys and values (`keep_keys`); a later one's segments attend to ranges
    of them (`earlier_context`: (row, start, end) each) first, then causally to themselves."""
    torch.manual_seed(0)
    heads, kv_heads, dim = 4, 2, 8
    module = torch.nn.Module()
    module.num_key_value_groups, module.layer_idx = heads // kv_heads, 3
    kept = KeptKeys()
    first_k, first_v = torch.randn(2, kv_heads, 6, dim), torch.randn(2, kv_heads, 6, dim)
    segment_attention(
        module, torch.randn(2, heads, 6, dim), first_k, first_v, None, segments=[[0, 0, 6, 0, 0]], keep_keys=kept
    )
    assert torch.equal(kept.layers[3][0], first_k) and not kept.layers[3][0].requires_grad
    q, k, v = torch.randn(1, heads, 5, dim), torch.randn(1, kv_heads, 5, dim), torch.randn(1, kv_heads, 5, dim)
    context = [[(1, 0, 4)], [(0, 1, 3), (0, 4, 5)]]
    segments = [[0, 0, 3, 0, 0], [0, 3, 5, 0, 0]]
    out, _ = segment_attention(
        module, q, k, v, None, scaling=dim**-0.5, segments=segments, earlier_keys=kept, earlier_context=context
    )
    for (_, start, end, *_), ranges in zip(segments, context):
        keys = torch.cat([*(first_k[r, :, a:b] for r, a, b in ranges), k[0, :, start:end]], 1).repeat_interleave(2, 0)
        values = torch.cat([*(first_v[r, :, a:b] for r, a, b in ranges), v[0, :, start:end]], 1).repeat_interleave(2, 0)
        n, c = end - start, keys.shape[1] - (end - start)
        mask = torch.ones(n, c + n, dtype=torch.bool).tril(c)  # all of the context, then causal
        scores = (q[0, :, start:end] @ keys.transpose(-1, -2) * dim**-0.5).masked_fill(~mask, float("-inf"))
        torch.testing.assert_close(out[0, start:end], (scores.softmax(-1) @ values).transpose(0, 1))


def test_segment_attention_builds_no_dense_mask_and_without_segments_is_sdpa(monkeypatch):
    import transformers.masking_utils as masking
    from trl.trainer.utils import add_fused_lm_head

    model = tiny_model()
    model.set_attn_implementation(SEGMENT_ATTENTION)
    add_fused_lm_head(model)
    rows = [
        dict(
            chosen_input_ids=[2, 5, 6, 7],
            chosen_labels=[X, X, 6, 7],
            rejected_input_ids=[2, 5, 8],
            rejected_labels=[X, X, 8],
            prompt_len=2,
            row=0,
        )
    ]
    built = []
    original = masking.sdpa_mask
    monkeypatch.setitem(
        masking.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping,
        SEGMENT_ATTENTION,
        lambda *a, **k: built.append(original(*a, **k)) or built[-1],
    )
    from mtdpo.train.forward import fused_sequence_logps

    for options in ({"prefix_sharing": True}, {"padding_free": True}, {"segments": True}):
        fused_sequence_logps(model, PairCollator(0, **options)(rows))
    assert built and all(mask is None for mask in built)  # no [T, T] mask for any layout
    ids = torch.tensor([[2, 5, 6, 7]])
    reference = tiny_model()
    torch.testing.assert_close(
        model(input_ids=ids).logits, reference(input_ids=ids).logits
    )  # a plain forward: an ordinary model


def shared_prompt_roles(n: int) -> list[tuple[str, ...]]:
    roles = []
    for row in make_pairs(n, seed=3):  # trainkit.make_cache's rows
        n_shared = next(i for i, (a, b) in enumerate(zip(row["chosen"], row["rejected"])) if a != b)
        roles.append(tuple(m["role"] for m in row["chosen"][:n_shared]))
    return roles


@pytest.mark.parametrize("layout", ["padding_free", "prefix_sharing"])
def test_layouts_give_the_padded_losses_and_gradients(cache, tmp_path, layout):
    """fp32, a live reference, multi-turn pairs whose shared prompt holds earlier assistant and tool
    turns, plus one pair with trained tokens inside its shared prompt."""
    from helpers import cache_dataset

    indices = [i for i, roles in enumerate(shared_prompt_roles(24)) if "tool" in roles][:2] + [0, 1]
    assert len(indices) == 4 and "assistant" in shared_prompt_roles(24)[indices[0]]
    rows = [cache_dataset(cache)[i] for i in indices]
    p = rows[3]["prompt_len"]
    for side in ("chosen", "rejected"):  # a common token prefix past the prompt messages is trained on both sides
        rows[3][f"{side}_labels"][p - 3 : p] = rows[3][f"{side}_input_ids"][p - 3 : p]
    results = []
    for options in ({}, {layout: True}):
        model = tiny_model()
        model.set_attn_implementation(SEGMENT_ATTENTION)
        ref = tiny_model(seed=1)
        ref.set_attn_implementation(SEGMENT_ATTENTION)
        trainer = mtdpo_trainer(cache, model, ref, tmp_path, bf16=False)
        results.append(loss_metrics_grads(trainer, PairCollator(0, segments=True, **options)(rows)))
    (loss_a, metrics_a, grads_a), (loss_b, metrics_b, grads_b) = results
    assert loss_b == pytest.approx(loss_a, abs=1e-5)
    for name in ("nll", "logps/chosen", "logps/rejected"):
        assert metrics_b[name] == pytest.approx(metrics_a[name], rel=1e-5)
    # margins are beta x differences of log-probs summed in another order (fp32 rounding of sums ~ -300)
    assert metrics_b["rewards/margins"] == pytest.approx(metrics_a["rewards/margins"], abs=1e-4)
    assert max((a - b).abs().max().item() for a, b in zip(grads_a, grads_b)) < 1e-5
    # and the padded segment path equals transformers' own sdpa on the padded batch
    model = tiny_model()
    trainer = mtdpo_trainer(cache, model, tiny_model(seed=1), tmp_path, bf16=False)
    assert trainer.pair_loss(trainer.model, PairCollator(0)(rows))[0].item() == pytest.approx(loss_a, abs=1e-5)


def test_layout_follows_the_attention_kernel():
    plain = tiny_model().config
    assert choose_layout("sdpa", None, False, plain).prefix_sharing  # on by default where it fits
    assert choose_layout("sdpa", None, False, plain).attention == SEGMENT_ATTENTION
    off = choose_layout("sdpa", False, True, plain)
    assert (off.prefix_sharing, off.padding_free, off.attention) == (False, True, SEGMENT_ATTENTION)
    eager = choose_layout("eager", None, True, plain)  # packing would need a dense mask: padded, said once
    assert (eager.prefix_sharing, eager.padding_free) == (False, False) and "padded batches instead" in eager.note
    assert choose_layout("flash_attention_2", None, True, plain).padding_free
    with pytest.raises(UsageError, match="--prefix-sharing needs segment attention"):
        choose_layout("eager", True, False, plain)
    capped = plain.__class__(**{**plain.to_dict(), "sliding_window": 64})
    assert choose_layout("sdpa", None, False, capped).attention == "sdpa"


def test_precision_is_bf16_where_the_hardware_has_it(monkeypatch, tmp_path):
    import mtdpo.train.config as config

    monkeypatch.setattr(config, "_has_accelerator", lambda: False)
    monkeypatch.setattr(config, "cpu_has_bf16_matmul", lambda: "amx_bf16")
    assert config.auto_bf16(use_cpu=True) == (True, "auto: this CPU has bf16 matmul (amx_bf16)")
    monkeypatch.setattr(config, "cpu_has_bf16_matmul", lambda: None)
    assert config.auto_bf16(use_cpu=True)[0] is False
    args = ["--data", "x", "--output-dir", str(tmp_path), "--use-cpu"]
    assert config.parse_train_args(args).bf16 is False
    assert config.parse_train_args([*args, "--bf16"]).bf16 is True
    parsed = config.parse_train_args([*args, "--no-bf16", "--no-prefix-sharing"])
    assert (parsed.bf16, parsed.prefix_sharing, parsed.precision_note) == (False, False, "set by --no-bf16")


def test_mfu_is_trl_flops_over_the_peak():
    from trl.trainer.utils import compute_flops_per_token

    from mtdpo.train.throughput import mfu_percent, peak_flops

    config = tiny_model().config
    flops = compute_flops_per_token(config, 100)
    assert mfu_percent(config, 1000.0, 100.4, 1e12, 2) == pytest.approx(100 * flops * 1000 / 2e12)
    peak, note = peak_flops(torch.device("cpu"), True)
    assert peak is None and note == "MFU: not computed (no known peak FLOP/s for a CPU at bfloat16)"
