"""Every use of another library's private API, in one place, each with why it is worth it.

An upgrade of transformers, datasets, jinja2 or DeepSpeed that moves one of these breaks here
(tests/test_compat.py checks that each still exists), not somewhere deep in a run.
"""

from __future__ import annotations

import contextlib

# Trainer methods MultiTurnDPOTrainer overrides that transformers does not document as hooks:
# _get_num_items_in_batch (the step's pair and token counts, for step-exact losses), _run_epoch
# (hands the epoch to the sampler on every resume path), _get_train_sampler / _get_eval_sampler
# (seeded, length-grouped orders).
TRAINER_HOOKS = ("_get_num_items_in_batch", "_run_epoch", "_get_train_sampler", "_get_eval_sampler")


def compile_chat_template(source: str):
    """A chat template compiled exactly as transformers compiles it (same sandbox, filters and
    globals, so the same text and errors as `apply_chat_template`), as a jinja2 Template we can
    render directly: apply_chat_template's per-call work dominates when every row renders
    several prefixes."""
    from transformers.utils.chat_template_utils import _cached_compile_jinja_template

    return _cached_compile_jinja_template(source)


def render_template(template, variables: dict, globals: dict) -> str:
    """`template.render(**variables)` without re-merging the template's globals on every call
    (`globals` is that merge, done once by the caller)."""
    from jinja2.runtime import new_context

    context = new_context(template.environment, template.name, template.blocks, variables, shared=True, globals=globals)
    return template.environment.concat(template.root_render_func(context))


def arrow_writer_progress(writer) -> tuple[int, int]:
    """(rows, bytes) a datasets ArrowWriter has written so far: where a shard is cut."""
    return writer._num_examples, writer._num_bytes


def parse_size(text: str) -> int:
    """'500MB' -> bytes, as datasets reads its own max_shard_size (ValueError if it cannot)."""
    from datasets.utils.py_utils import convert_file_size_to_int

    return convert_file_size_to_int(text)


def dataset_info_dict(features) -> dict:
    """dataset_info.json's content for `features`, as `save_to_disk` writes it."""
    from datasets import DatasetInfo
    from datasets.utils.py_utils import asdict

    return asdict(DatasetInfo(features=features))


@contextlib.contextmanager
def zero3_off():
    """Under ZeRO-3, from_pretrained partitions the weights as it loads them, a collective that
    waits for every rank: the main process alone loads a whole model only with it switched off.
    transformers keeps the DeepSpeed config in a module global (a weak reference)."""
    from transformers.integrations import deepspeed

    saved = deepspeed._hf_deepspeed_config_weak_ref
    deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        deepspeed._hf_deepspeed_config_weak_ref = saved
