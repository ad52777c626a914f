"""Tokenizer and chat template, against a tiny byte-level BPE trained here and against
transformers on the same files."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFBackend
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from kunlite.engine.tokenizer import Tokenizer

CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "Ça va? Où est la bibliothèque? Une naïve café crème, s'il vous plaît.",
    "日本語のテキストと中文文本，还有한국어 문장도 있습니다。",
    "emoji 😀🎉👍🏽 and flags 🇫🇷🇯🇵, plus ZWJ 👩‍👩‍👧 families",
    "Grüße aus München, ñandú, Ελληνικά γράμματα, русский текст, עברית, العربية",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHATML = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set rest = messages[1:] -%}"
    "{%- else -%}{%- set system = 'You are helpful.' -%}{%- set rest = messages -%}{%- endif -%}\n"
    "<|im_start|>system\n{{ system }}{% if tools %}\n\nTools:\n{{ tools | tojson }}{% endif %}<|im_end|>\n"
    "{% for message in rest %}\n"
    "  {% if message['role'] not in ['user', 'assistant'] %}\n"
    "    {{ raise_exception('Unsupported role: ' + message['role']) }}\n"
    "  {% endif %}\n"
    "  {% if loop.index > 50 %}{% break %}{% endif %}\n"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}{% endgeneration %}"
    "{% else %}{{ message['content'] }}{% endif %}<|im_end|>\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

MESSAGES = [
    [{"role": "user", "content": "Hi there <b>&</b> 日本語 😀"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
    [{"role": "user", "content": "x", "name": None}],  # None values are dropped, as in HF
]


def write_tiny_bpe(root: Path, *, chat_template: str | None = CHATML, extra_config: dict | None = None,
                   bos_post_processor: bool = False) -> Path:
    """Train a byte-level BPE on CORPUS and save a HF model dir (tokenizer.json + config)."""
    tok = HFBackend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, min_frequency=1, show_progress=False, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    if bos_post_processor:  # Llama 3 style: the post-processor adds BOS
        start = tok.token_to_id("<|im_start|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|im_start|> $A", pair="<|im_start|> $A <|im_start|> $B", special_tokens=[("<|im_start|>", start)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    root.mkdir(parents=True, exist_ok=True)
    tok.save(str(root / "tokenizer.json"))
    config: dict = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
                    "bos_token": "<|im_start|>", "clean_up_tokenization_spaces": False}
    if chat_template is not None:
        config["chat_template"] = chat_template
    config.update(extra_config or {})
    (root / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_bpe(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def hf_tiny(tiny_dir: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tiny_dir))


# ---------------------------------------------------------------------------- tokens


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=60))
def test_encode_decode_match_transformers(tiny: Tokenizer, hf_tiny, text: str) -> None:
    ids = tiny.encode(text)
    assert ids == hf_tiny.encode(text)
    assert tiny.decode(ids) == hf_tiny.decode(ids, skip_special_tokens=True) == text  # byte-level round trip


def test_special_tokens(tiny: Tokenizer, hf_tiny) -> None:
    eos = tiny.eos_token_id
    assert eos == hf_tiny.eos_token_id and tiny.eos_token_ids == frozenset({eos})
    assert tiny.bos_token_id == hf_tiny.bos_token_id and tiny.bos_token == "<|im_start|>"
    assert tiny.vocab_size == len(hf_tiny)
    assert tiny.all_special_ids == frozenset(range(len(SPECIALS)))  # every special added token
    assert not tiny.add_bos_token  # SmolLM2 / Qwen2 style: no BOS although bos_token is set
    ids = tiny.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == tiny.bos_token_id and ids[-1] == eos  # special tokens in text are tokens
    assert tiny.decode(ids) == "user\nhi"
    assert tiny.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"
    assert tiny.convert_ids_to_tokens(ids[:1]) == ["<|im_start|>"]
    with pytest.raises(ValueError):
        tiny.convert_ids_to_tokens([tiny.vocab_size])
    with pytest.raises(ValueError):
        tiny.encode("lone \ud800 surrogate")


def test_bos_from_post_processor_and_config(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    llama3 = write_tiny_bpe(tmp_path / "llama3", bos_post_processor=True)
    ours, hf = Tokenizer.from_pretrained(llama3), transformers.AutoTokenizer.from_pretrained(str(llama3))
    assert ours.add_bos_token and ours.encode("héllo") == hf.encode("héllo")
    assert ours.encode("héllo", add_special_tokens=False) == hf.encode("héllo", add_special_tokens=False)
    # An explicit add_bos_token in tokenizer_config wins over the post-processor (Llama 2 style).
    on = Tokenizer.from_pretrained(write_tiny_bpe(tmp_path / "on", extra_config={"add_bos_token": True}))
    assert on.encode("abc") == [on.bos_token_id] + on.encode("abc", add_special_tokens=False)
    off = Tokenizer.from_pretrained(
        write_tiny_bpe(tmp_path / "off", bos_post_processor=True, extra_config={"add_bos_token": False}))
    assert not off.add_bos_token and off.encode("abc") == off.encode("abc", add_special_tokens=False)


def test_generation_config_eos_and_added_tokens(tmp_path: Path) -> None:
    root = write_tiny_bpe(tmp_path, extra_config={"added_tokens_decoder": {
        "0": {"content": "<|endoftext|>", "special": True}}})
    (root / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    tok = Tokenizer.from_pretrained(root)
    assert tok.eos_token_ids == frozenset({0, 2, tok.eos_token_id})
    (root / "generation_config.json").write_text(json.dumps({"eos_token_id": 1}))
    assert Tokenizer.from_pretrained(root).eos_token_ids == frozenset({1, tok.eos_token_id})
    # An added token that tokenizer.json lacks is added when its id is the next one.
    nxt = tok.vocab_size
    cfg = json.loads((root / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"] = {str(nxt): {"content": "<tool_call>", "special": False}}
    (root / "tokenizer_config.json").write_text(json.dumps(cfg))
    extended = Tokenizer.from_pretrained(root)
    assert extended.vocab_size == nxt + 1 and extended.encode("<tool_call>") == [nxt]


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------- chat template


@pytest.mark.parametrize("messages", MESSAGES)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tiny: Tokenizer, hf_tiny, messages, add_generation_prompt) -> None:
    ours = tiny.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf_tiny.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert ours == theirs
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt
    assert "&" in ours or "&" not in json.dumps(messages)  # no HTML escaping


def test_chat_template_with_tools_matches_transformers(tiny: Tokenizer, hf_tiny) -> None:
    tools = [{"type": "function", "function": {"name": "weather", "description": "Météo <today>",
                                               "parameters": {"type": "object", "properties": {}}}}]
    ours = tiny.apply_chat_template(MESSAGES[0], tools=tools)
    assert ours == hf_tiny.apply_chat_template(MESSAGES[0], tools=tools, tokenize=False, add_generation_prompt=True)
    assert '"Météo <today>"' in ours  # tojson keeps non-ASCII and does not escape HTML


def test_chat_template_from_sandboxed_features(tmp_path: Path) -> None:
    template = "{{ strftime_now('%Y') }}~{{ {'b': 1, 'a': [1, 2]} | tojson(indent=1, sort_keys=True) }}~{{ eos_token }}"
    tok = Tokenizer.from_pretrained(write_tiny_bpe(tmp_path, chat_template=template))
    year, js, eos = tok.apply_chat_template([{"role": "user", "content": "x"}]).split("~")
    assert year in {str(datetime.now().year), str(datetime.now().year - 1)}
    assert json.loads(js) == {"a": [1, 2], "b": 1} and "\n" in js and eos == "<|im_end|>"


def test_chat_template_jinja_file_takes_priority(tmp_path: Path) -> None:
    root = write_tiny_bpe(tmp_path)
    (root / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.content }}]{% endfor %}")
    assert Tokenizer.from_pretrained(root).apply_chat_template([{"role": "user", "content": "a"}]) == "[a]"


def test_named_templates_pick_tool_use(tmp_path: Path) -> None:
    named = [{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}]
    tok = Tokenizer.from_pretrained(write_tiny_bpe(tmp_path, chat_template=named))  # type: ignore[arg-type]
    msgs = [{"role": "user", "content": "a"}]
    assert tok.apply_chat_template(msgs) == "D" and tok.apply_chat_template(msgs, tools=[{"x": 1}]) == "T"


def test_content_parts_are_joined(tiny: Tokenizer) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]
    assert tiny.apply_chat_template(parts) == tiny.apply_chat_template([{"role": "user", "content": "one\ntwo"}])
    with pytest.raises(ValueError, match="image_url"):
        tiny.apply_chat_template([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


def test_template_errors_become_value_errors(tiny: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="^Unsupported role: tool$"):
        tiny.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError):  # messages[0] of an empty list: undefined inside the template
        tiny.apply_chat_template([])
    with pytest.raises(ValueError, match="must be an object"):
        tiny.apply_chat_template(["hello"])  # type: ignore[list-item]
    dunder = Tokenizer.from_pretrained(write_tiny_bpe(tmp_path / "d", chat_template="[{{ messages.__class__ }}]"))
    assert dunder.apply_chat_template([{"role": "user", "content": "x"}]) == "[]"  # the sandbox hides it
    mutate = Tokenizer.from_pretrained(write_tiny_bpe(tmp_path / "m", chat_template="{{ messages.append(1) }}"))
    with pytest.raises(ValueError, match="unsafe"):  # immutable sandbox
        mutate.apply_chat_template([{"role": "user", "content": "x"}])
    broken = Tokenizer.from_pretrained(write_tiny_bpe(tmp_path / "b", chat_template="{% for %}"))
    with pytest.raises(ValueError, match="does not compile"):
        broken.apply_chat_template([{"role": "user", "content": "x"}])
    none = Tokenizer.from_pretrained(write_tiny_bpe(tmp_path / "n", chat_template=None))
    assert not none.has_chat_template
    with pytest.raises(ValueError, match="^this model has no chat template$"):
        none.apply_chat_template([{"role": "user", "content": "x"}])


# ---------------------------------------------------------------------------- a real model, when pulled


def smollm2_dir() -> Path:
    """The pulled SmolLM2 model dir, or skip: the checks against it are an optional extra."""
    home = Path(os.environ.get("KUNLITE_HOME", Path.home() / ".cache" / "kunlite"))
    model_dir = home / "models" / "SmolLM2-135M-Instruct"
    if not (model_dir / "tokenizer.json").is_file():
        pytest.skip(f"optional check: {model_dir} has not been pulled")
    return model_dir


def test_smollm2_matches_transformers() -> None:
    model_dir = smollm2_dir()
    transformers = pytest.importorskip("transformers")
    ours, hf = Tokenizer.from_pretrained(model_dir), transformers.AutoTokenizer.from_pretrained(str(model_dir))
    for text in ["Hello, world!", "  leading spaces and 日本語 😀", "<|im_start|>user\nhi<|im_end|>"]:
        assert ours.encode(text) == hf.encode(text)
        assert ours.decode(ours.encode(text)) == hf.decode(hf.encode(text), skip_special_tokens=True)
    assert not ours.add_bos_token and hf.eos_token_id in ours.eos_token_ids
    for messages in MESSAGES:
        for add in (True, False):
            assert ours.apply_chat_template(messages, add_generation_prompt=add) == hf.apply_chat_template(
                messages, add_generation_prompt=add, tokenize=False)
