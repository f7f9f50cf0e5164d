"""Chat messages through an HF directory's template: rendered as transformers'
apply_chat_template renders them (a template of our own using namespace, tojson, trim, loop
filters and raise_exception), encoded without special tokens, decoded as transformers decodes
the same ids; bad messages and a model without a template are refused by name; the CLI's
--chat on a GGUF file."""

import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf", reason="the tokenizer is built from a tiny GGUF (the [gguf] extra)")

from gguf_files import vocabulary, write_tiny  # noqa: E402
from tiny_models import make_hf_model  # noqa: E402

from medusa_kernels import generate, load_model  # noqa: E402
from medusa_kernels.chat import render  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = len(vocabulary()[0])
TEMPLATE = (
    "{%- set ns = namespace(sys='') -%}"
    "{%- for m in messages -%}{%- if m.role == 'system' -%}{%- set ns.sys = m.content -%}"
    "{%- endif -%}{%- endfor -%}"
    "{{ bos_token }}{% if ns.sys %}[SYS]{{ ns.sys | tojson }}[/SYS]\n{% endif %}"
    "{% for m in messages if m.role != 'system' %}"
    "{% if m.role not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + m.role) }}"
    "{% endif %}<|im_start|>{{ m.role }}\n{{ m.content | trim }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATS = [
    [{"role": "user", "content": "the cat"}],
    [{"role": "system", "content": 'Say "hi" <b>&</b> é'}, {"role": "user", "content": "  in "},
     {"role": "assistant", "content": "the hat"}, {"role": "user", "content": "on\n"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"},
     {"role": "user", "content": "ending"}],
]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny llama HF directory: weights, tokenizer.json (the tiny GGUF vocabulary, saved by
    transformers), tokenizer_config.json with our template."""
    folder = tmp_path_factory.mktemp("chat")
    write_tiny(folder / "v.gguf", "llama", "F32", layers=1)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file="v.gguf")
    os.remove(folder / "v.gguf")
    tok.chat_template = TEMPLATE
    model_dir = folder / "model"
    hf = make_hf_model("llama-mha", path=model_dir, vocab_size=V, eos_token_id=2)
    tok.save_pretrained(model_dir)
    return model_dir, hf


def test_rendering_ids_and_reply_match_transformers(hf_dir):
    model_dir, hf = hf_dir
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = load_model(model_dir, dtype=torch.float32)
    assert model.chat_template() == tok.chat_template == TEMPLATE
    texts = render(model.chat_template(), CHATS, model.special_tokens())
    for chat, text in zip(CHATS, texts, strict=True):
        assert text == tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    out = generate(model, CHATS, max_new_tokens=5, medusa=False, eos_token_id=[])
    for b, chat in enumerate(CHATS):
        ids = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        ids = torch.tensor([list(ids["input_ids"] if hasattr(ids, "keys") else ids)])
        with torch.no_grad():
            want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                               do_sample=False, eos_token_id=None, pad_token_id=0)
        assert out.tokens[b] == want[0, ids.shape[1]:].tolist()
        assert out.text[b] == tok.decode(out.tokens[b], skip_special_tokens=True)
    one = generate(model, CHATS[1], max_new_tokens=5, medusa=False, eos_token_id=[])
    assert one.tokens == out.tokens[1:2]  # one conversation, or a batch of one


@pytest.mark.parametrize("prompt,error,words", [
    ([{"role": "tool", "content": "x"}], ValueError, ["chat template refused", "bad role tool"]),
    ([{"content": "x"}], ValueError, ["prompt[0]", "'role'"]),
    ([{"role": "user", "content": 3}], ValueError, ["prompt[0] (user)", "'content'", "int"]),
    ([[{"role": "user", "content": "x"}], "text"], TypeError, ["prompt[1]", "list of messages"]),
    ([[{"role": "user", "content": "x"}], [{"role": "user"}, 5]], TypeError,
     ["prompt[1][1]", "message dict"]),
])
def test_bad_messages_are_refused_by_name(hf_dir, prompt, error, words):
    model = load_model(hf_dir[0], dtype=torch.float32)
    with pytest.raises(error) as info:
        generate(model, prompt, max_new_tokens=2, medusa=False)
    for w in words:
        assert w in str(info.value), str(info.value)


def test_a_model_without_a_template_says_so(tmp_path):
    make_hf_model("llama-mha", path=tmp_path)
    model = load_model(tmp_path)
    with pytest.raises(ValueError, match="has no chat template"):
        generate(model, [{"role": "user", "content": "hi"}], max_new_tokens=2, medusa=False)


def test_cli_chat_on_a_gguf_file(tmp_path):
    path = write_tiny(tmp_path / "m.gguf", "qwen2", "Q8_0", layers=1)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "medusa_kernels.generate", "--model", path,
                          "--chat", "the cat", "--no-medusa", "--max-new-tokens", "4",
                          "--eos-token-id", "none"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    model = load_model(path)
    want = generate(model, [{"role": "user", "content": "the cat"}], max_new_tokens=4,
                    medusa=False, eos_token_id=[])
    assert run.stdout.startswith(want.text[0]) and "[plain] 4 tokens" in run.stderr
    both = subprocess.run([sys.executable, "-m", "medusa_kernels.generate", "--model", path,
                           "--chat", "x", "--prompt", "y"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert both.returncode == 2 and "--prompt and --chat" in both.stderr
    (tmp_path / "x.bin").write_bytes(b"no gguf")
    bad = subprocess.run([sys.executable, "-m", "medusa_kernels.generate", "--model",
                          str(tmp_path / "x.bin"), "--chat", "x"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "without GGUF's magic number" in bad.stderr, bad.stderr
