"""Chat prompts: messages -> the checkpoint's chat template, rendered as transformers renders it.

``render(template, conversations, special_tokens)`` is transformers'
``tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)``: the
same jinja2 environment (a sandbox with ``trim_blocks``, ``lstrip_blocks``, the loop-controls
extension and the ``{% generation %}`` tag; the ``tojson`` filter without HTML escaping;
``raise_exception``, ``strftime_now``, ``dict`` and ``namespace``), messages with None values
dropped and the reasoning field aliases filled, and the special tokens (``bos_token``,
``eos_token``, ...) as template variables. The rendered text is then encoded without adding
special tokens (the template writes them), as ``apply_chat_template(..., tokenize=True)`` does.

``chat_files(model_dir)``: an HF directory's template (chat_template.jinja, else
tokenizer_config.json's ``chat_template``, a string or a list of named templates: "default")
and its special token strings.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from .generation_config import describe

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                       "cls_token", "mask_token")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def is_chat(prompt: Any) -> bool:
    """Whether ``prompt`` is chat messages: a list of dicts, or a list of such lists."""
    if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence) or not prompt:
        return False
    first = prompt[0]
    if isinstance(first, Mapping):
        return True
    return isinstance(first, Sequence) and not isinstance(first, (str, bytes)) and \
        len(first) > 0 and isinstance(first[0], Mapping)


def conversations(prompt: Any, name: str = "prompt") -> list[list[dict]]:
    """One checked list of messages per sequence: each a dict with a string ``role`` and a
    ``content`` (a string, or a list of content blocks as multimodal templates take them; None
    or absent for, e.g., an assistant turn of tool calls); keys whose value is None dropped (as
    transformers does)."""
    batch = [prompt] if isinstance(prompt[0], Mapping) else list(prompt)
    out = []
    for b, conv in enumerate(batch):
        where = f"{name}[{b}]" if len(batch) > 1 or batch[0] is not prompt else name
        if isinstance(conv, (str, bytes)) or not isinstance(conv, Sequence) or not conv:
            raise TypeError(f"{where} must be a non-empty list of messages ({{'role': ..., "
                            f"'content': ...}} dicts), got {describe(conv)}")
        msgs = []
        for i, m in enumerate(conv):
            if not isinstance(m, Mapping):
                raise TypeError(f"{where}[{i}] must be a message dict with 'role' and "
                                f"'content', got {describe(m)}")
            if not isinstance(m.get("role"), str):
                raise ValueError(f"{where}[{i}] needs a string 'role' ('system', 'user', "
                                 f"'assistant', ...), got {describe(m.get('role'))}")
            if m.get("content") is not None and not isinstance(m["content"], (str, list)):
                raise ValueError(f"{where}[{i}] ({m['role']}): 'content' must be a string (or "
                                 f"a list of content blocks), got {describe(m['content'])}")
            msgs.append({k: v for k, v in m.items() if v is not None})
        out.append(msgs)
    return out


def _alias_reasoning(chat: list[dict]) -> list[dict]:
    out = []
    for m in chat:
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


@functools.lru_cache(maxsize=16)
def compile_template(template: str):
    """The jinja2 template in transformers' chat environment (cached per template text)."""
    try:
        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ImportError("chat templates need jinja2: pip install jinja2") from None

    class GenerationTag(Extension):  # {% generation %}...{% endgeneration %}: its body
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body
                                          ).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for key in attrs:
                TemplateNamespace._check_name(key)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, key, value):
            TemplateNamespace._check_name(key)
            jinja2.utils.Namespace.__setitem__(self, key, value)

        @staticmethod
        def _check_name(key):
            if isinstance(key, str) and key.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes on a "
                    f"namespace, got {key!r}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now,
                       dict=TemplateDict(), namespace=TemplateNamespace)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"the checkpoint's chat template is not valid jinja2: {e}") from None


def render(template: str | None, convs: list[list[dict]], special_tokens: Mapping[str, str],
           where: str = "the model", add_generation_prompt: bool = True) -> list[str]:
    """Each conversation rendered by ``template`` (transformers' ``apply_chat_template(...,
    tokenize=False)``); a clear ValueError for a model without a template."""
    if template is None:
        raise ValueError(f"{where} has no chat template (tokenizer_config.json chat_template, "
                         "chat_template.jinja, or GGUF tokenizer.chat_template): pass the prompt "
                         "as text or token ids instead of messages")
    compiled = compile_template(template)
    import jinja2

    out = []
    for conv in convs:
        try:
            out.append(compiled.render(messages=_alias_reasoning(conv), tools=None,
                                       documents=None,
                                       add_generation_prompt=add_generation_prompt,
                                       **special_tokens))
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"{where}'s chat template refused the messages: {e}") from None
    return out


def _token_str(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it (a string or an AddedToken dict)."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def chat_files(model_dir: str | os.PathLike) -> tuple[str | None, dict[str, str]]:
    """(chat template or None, special token strings) of an HF model directory, as transformers
    loads them (chat_template.jinja wins over tokenizer_config.json's ``chat_template``)."""
    template, specials = None, {}
    cfg_path = os.path.join(model_dir, "tokenizer_config.json")
    cfg: Any = {}
    if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            try:
                cfg = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
        cfg = cfg if isinstance(cfg, dict) else {}
    for extra in ("special_tokens_map.json",):  # legacy file: tokenizer_config.json wins
        path = os.path.join(model_dir, extra)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                try:
                    legacy = json.load(f)
                except json.JSONDecodeError:
                    legacy = {}
            for key in SPECIAL_TOKEN_NAMES:
                if isinstance(legacy, dict) and _token_str(legacy.get(key)) is not None:
                    specials[key] = _token_str(legacy[key])
    for key in SPECIAL_TOKEN_NAMES:
        if _token_str(cfg.get(key)) is not None:
            specials[key] = _token_str(cfg[key])
    raw = cfg.get("chat_template")
    if isinstance(raw, list):  # named templates: the default one
        raw = next((t.get("template") for t in raw if isinstance(t, dict)
                    and t.get("name") == "default"), None)
    template = raw if isinstance(raw, str) else None
    jinja_path = os.path.join(model_dir, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            template = f.read()
    return template, specials


def encode_chat(texts: list[str], tokenizer, where: str = "the model") -> list[list[int]]:
    """Rendered chats -> token ids, without adding special tokens (the template wrote them)."""
    if tokenizer is None:
        raise ValueError(f"{where} has no tokenizer: chat messages need one to be encoded")
    return [tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
