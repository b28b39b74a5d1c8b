"""A tokenizer's chat template, rendered exactly as `apply_chat_template(tokenize=False)` renders
it: transformers' own compiled, sandboxed Jinja template and variables, without its per-call
overhead (every row renders several prefixes of itself). Also what the masking rule needs to
know about the template: which strings may end a turn, and what it appends to every render.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

from mtdpo import compat
from mtdpo.preprocess.limits import RenderTimeout
from mtdpo.preprocess.rows import RowError

# A render of the conversation so far: (messages, add_generation_prompt) -> text.
Render = Callable[[list, bool], str]


class ChatTemplate:
    def __init__(self, tokenizer):
        self.markers = end_markers(tokenizer)
        self._template = compile_template(tokenizer.chat_template)
        # Every call's variables over the template's globals, as Template.render merges them, but
        # with the globals (a ChainMap, which dict() walks in Python) flattened once, not per call.
        self._globals = dict(self._template.globals)
        self._variables = {**self._globals, **tokenizer.special_tokens_map}
        self.closing = self._closing()
        self.end_of_turn = self._end_of_turn()
        self.untokenized_end = "" if self.end_of_turn else self._untokenized_end()

    def render(self, messages: list[dict], generation_prompt: bool = False, tools=None, template_kwargs=None) -> str:
        """`Template.render(messages=..., tools=..., documents=None, add_generation_prompt=...,
        **special tokens, **template_kwargs)`: the same text and errors."""
        variables = {**self._variables, **template_kwargs} if template_kwargs else dict(self._variables)
        variables.update(messages=messages, tools=tools, documents=None, add_generation_prompt=generation_prompt)
        try:
            return compat.render_template(self._template, variables, self._globals)
        except RenderTimeout:
            raise  # the row's time is up (limits.py): not an error of the template's own
        except Exception as err:  # the template's own error (raise_exception, bad roles …) is the reason
            raise RowError(f"chat template error: {err}") from None

    def renderer(self, tools=None, template_kwargs=None) -> Render:
        """`render` bound to one row's tools and template arguments."""
        return lambda messages, generation_prompt=False: self.render(
            messages, generation_prompt, tools, template_kwargs
        )

    def _closing(self) -> str:
        """A token the template appends to every render and the next message replaces
        (Phi-3 closes each render with <|endoftext|>): not part of the last message."""
        one = [{"role": "user", "content": "x"}]
        two = [*one, {"role": "assistant", "content": "y"}]
        try:
            short, long = self.render(one), self.render(two)
        except RowError:
            return ""
        return next(
            (m for m in self.markers if short.endswith(m) and long.endswith(m) and not long.startswith(short)), ""
        )

    def _end_of_turn(self) -> str:
        """The marker that closes an assistant turn (`<|im_end|>`, `<end_of_turn>` …), from a probe."""
        body = self._probe_body()
        return next((m for m in self.markers if body.endswith(m)), "")

    def _untokenized_end(self) -> str:
        """What the template writes after an assistant turn's text when that is no added token of
        the tokenizer (Qwen's `<|im_end|>` with another model's tokenizer): the turn's end would be
        several ordinary tokens, so rows are rejected saying so. "" when the turn ends with its text."""
        answer = "mtdpo probe answer"
        body = self._probe_body(answer)
        return body[body.rfind(answer) + len(answer) :] if answer in body else ""

    def _probe_body(self, answer: str = "y") -> str:
        """A one-turn conversation (`x`, answered `answer`) rendered, without the closing token and trailing whitespace."""
        two = [{"role": "user", "content": "x"}, {"role": "assistant", "content": answer}]
        try:
            rendered = self.render(two)
        except RowError:
            return ""
        return (
            rendered[: -len(self.closing)] if self.closing and rendered.endswith(self.closing) else rendered
        ).rstrip()


@lru_cache(maxsize=8)
def compile_template(source: str):
    """The template compiled as transformers compiles it, with memoized attribute checks. Cached,
    so the up-front syntax check (preprocess/tokenizer.py) and ChatTemplate compile it once."""
    template = compat.compile_chat_template(source)
    memoize_attribute_checks(template.environment)
    return template


def memoize_attribute_checks(environment) -> None:
    """Jinja's immutable sandbox asks `is_safe_attribute(obj, attr, value)` at every attribute
    access in a template (a third of a render). Its answer depends only on type(obj) and attr
    (isinstance tests and name lists), so it is asked once per (type, attr): the same
    decisions, the same errors, at a dict lookup's cost."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if type(environment).is_safe_attribute is not ImmutableSandboxedEnvironment.is_safe_attribute:
        return  # a sandbox whose rule may depend on the value: ask every time
    ask, known = environment.is_safe_attribute, {}

    def is_safe_attribute(obj, attr: str, value) -> bool:
        key = (type(obj), attr)
        if key not in known:
            known[key] = ask(obj, attr, value)
        return known[key]

    environment.is_safe_attribute = is_safe_attribute


def end_markers(tokenizer) -> tuple[str, ...]:
    """Added-token strings (special or not), longest first: the candidates for an end-of-turn
    marker. A tuple, so `str.endswith(markers)` tests them all at C speed (Gemma 3 has 6k)."""
    added = {t.content for t in tokenizer.added_tokens_decoder.values()}
    return tuple(sorted(added, key=len, reverse=True))
