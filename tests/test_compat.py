"""Every private API mtdpo leans on (mtdpo/compat.py) still exists in the installed libraries:
an upgrade that moves one fails here, by name, not deep inside a run."""

from __future__ import annotations

import pytest
from transformers import Trainer

from mtdpo import compat


@pytest.mark.parametrize("hook", compat.TRAINER_HOOKS)
def test_the_trainer_hooks_mtdpo_overrides_exist(hook):
    assert callable(getattr(Trainer, hook, None)), f"transformers.Trainer.{hook} is gone: see mtdpo/compat.py"


def test_a_chat_template_renders_as_apply_chat_template_does():
    from helpers import embedded_tokenizer

    tok = embedded_tokenizer()
    template = compat.compile_chat_template(tok.chat_template)
    messages = [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]
    variables = {**template.globals, **tok.special_tokens_map, "messages": messages, "tools": None}
    variables.update(documents=None, add_generation_prompt=False)
    rendered = compat.render_template(template, variables, dict(template.globals))
    assert rendered == tok.apply_chat_template(messages, tokenize=False)


def test_an_arrow_writer_reports_what_it_wrote(tmp_path):
    import pyarrow as pa
    from datasets.arrow_writer import ArrowWriter

    writer = ArrowWriter(path=str(tmp_path / "x.arrow"))
    writer.write_table(pa.table({"a": [1, 2, 3]}))
    rows, size = compat.arrow_writer_progress(writer)
    writer.finalize()
    assert rows == 3 and size > 0


def test_sizes_and_dataset_info():
    from datasets import Features, Value

    assert compat.parse_size("2MB") == 2 * 10**6
    assert compat.dataset_info_dict(Features({"a": Value("int32")}))["features"] == {
        "a": {"dtype": "int32", "_type": "Value"}
    }


def test_the_deepspeed_switch_restores_the_config():
    from transformers.integrations import deepspeed

    before = deepspeed._hf_deepspeed_config_weak_ref
    with compat.zero3_off():
        assert deepspeed._hf_deepspeed_config_weak_ref is None
    assert deepspeed._hf_deepspeed_config_weak_ref is before
