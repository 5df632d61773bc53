"""Tokenizer: a thin wrapper around `tokenizers.Tokenizer`, the chat template and the
special tokens, loaded from a Hugging Face folder or from the vocabulary inside a GGUF file."""

import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend
from .errors import InvalidRequestError, TokenizerError

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
# transformers' SPECIAL_TOKENS_ATTRIBUTES: with `additional_special_tokens` and the extra special
# tokens, the tokens `all_special_tokens` names, which `skip_special_tokens` removes here.
NAMED_SPECIAL = (*SPECIAL_TOKEN_NAMES, "sep_token", "cls_token", "mask_token")
GGUF_CONTROL = 3  # llama.cpp token type of `<|im_start|>` and friends


def _template_env():
    # Same environment as transformers' `_compile_jinja_template`, so templates render alike.
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class Tokenizer:
    """Byte-level BPE tokenizer with the checkpoint's special tokens and chat template.

    `special_tokens` maps names such as `eos_token` or `image_token` to token strings.
    `skip_ids`: the ids `decode(..., skip_special_tokens=True)` drops (the tokenizer's named
    special tokens); None drops every added token the backend flags special.
    """

    def __init__(self, backend, chat_template=None, special_tokens=None, eos_token_ids=None,
                 skip_ids=None):
        self.backend = backend
        self.skip_ids = None if skip_ids is None else frozenset(skip_ids)
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})
        if eos_token_ids is None:
            eos = self.special_tokens.get("eos_token")
            eos_token_ids = [] if eos is None else [self.convert_tokens_to_ids(eos)]
        self.eos_token_ids = {int(i) for i in eos_token_ids if i is not None}
        self._templates = {}

    def __getattr__(self, name):
        # `tok.image_token`, `tok.eos_token`... as transformers' tokenizers expose them
        special = self.__dict__.get("special_tokens", {})
        if name in special:
            return special[name]
        raise AttributeError(name)

    @classmethod
    def from_gguf(cls, path, metadata=None):
        """Tokenizer from the vocabulary, merges and chat template stored in a GGUF file
        (`metadata`: the file's, when it was already read)."""
        backend, chat_template, special = tokenizer_from_gguf(path, metadata)
        return cls(backend, chat_template, special)

    @property
    def vocab(self):
        return self.backend.get_vocab(with_added_tokens=True)

    @property
    def vocab_size(self):
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text, add_special_tokens=False):
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens=False):
        ids = list(ids)
        if skip_special_tokens and self.skip_ids is not None:
            # Only the named ones: DocTags are added tokens flagged special but not named, and
            # docling's vLLM preset asks for skip_special_tokens and still expects them.
            return self.backend.decode([i for i in ids if i not in self.skip_ids], skip_special_tokens=False)
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i):
        return self.backend.id_to_token(int(i))

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self.id_to_token(ids)
        return [self.id_to_token(i) for i in ids]

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self.backend.token_to_id(tokens)
        return [self.backend.token_to_id(t) for t in tokens]

    def apply_chat_template(
        self, messages, add_generation_prompt=False, chat_template=None, **kwargs
    ):
        """Render `messages` with the checkpoint's own Jinja chat template (or `chat_template`)."""
        source = chat_template or self.chat_template
        if source is None:
            raise TokenizerError("this tokenizer has no chat template")
        if source not in self._templates:
            self._templates[source] = _template_env().from_string(source)
        if reads_parts_only(source):
            messages = [text_parts(m) for m in messages]
        elif reads_strings_only(source):
            messages = [text_string(m) for m in messages]
        return self._templates[source].render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            **{**self.special_tokens, **kwargs},
        )


def reads_parts_only(template: str) -> bool:
    """True for a template that reads each message's content as a list of typed parts and has no
    branch for a plain string, like the hub's SmolVLM chat templates: it would render string
    content as nothing (transformers does exactly that), so the model would see empty turns."""
    return "['type']" in template and "is string" not in template


def text_parts(message: dict) -> dict:
    """String content as one text part: what transformers' current SmolVLM2 template renders for
    a string (`': ' + content`), the legacy templates render for a text part."""
    if isinstance(message.get("content"), str):
        return {**message, "content": [{"type": "text", "text": message["content"]}]}
    return message


def reads_strings_only(template: str) -> bool:
    """True for a template that never looks inside a message's content, like SmolLM2's text-only
    one (`message['content'] + ...`): a list of parts would be a jinja TypeError."""
    return not any(k in template for k in ("['type']", '["type"]', ".type", "is string", "is not string",
                                           "is mapping", "is iterable", "is sequence"))


def text_string(message: dict) -> dict:
    """Text parts joined into the string such a template takes; media it cannot place."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    kinds = sorted({p.get("type") for p in content if p.get("type") != "text"})
    if kinds:
        raise InvalidRequestError(
            f"this model's chat template takes text only (string content), so it cannot place the "
            f"{'/'.join(kinds)} of a {message.get('role')} message; use a SmolVLM chat template"
        )
    return {**message, "content": "".join(p.get("text", "") for p in content)}


def read_json(path):
    """A checkpoint JSON file as a dict; {} when the file is absent."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None


def _token_content(value):
    # tokenizer_config writes special tokens either as strings or as AddedToken dicts
    return value.get("content") if isinstance(value, dict) else value


def read_chat_template(path):
    """A folder's chat template: chat_template.jinja, chat_template.json or tokenizer_config."""
    path = Path(path)
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").is_file():
        return read_json(path / "chat_template.json").get("chat_template")
    return read_json(path / "tokenizer_config.json").get("chat_template")


def load_tokenizer(path):
    """Load the tokenizer of a Hugging Face checkpoint folder."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise TokenizerError(f"{path}: no tokenizer.json")
    backend = _Backend.from_file(str(path / "tokenizer.json"))
    config = read_json(path / "tokenizer_config.json")
    special = {}
    for name, value in config.items():
        if name.endswith("_token") and isinstance(_token_content(value), str):
            special[name] = _token_content(value)
    # transformers 4 wrote named extra tokens as a dict under `extra_special_tokens`;
    # transformers 5 writes there a list of unnamed ones, the named ones being top-level
    # `*_token` keys (read above) or, in some versions, under `model_specific_special_tokens`.
    for key in ("extra_special_tokens", "model_specific_special_tokens"):
        named = config.get(key)
        if isinstance(named, dict):
            special.update((name, _token_content(value)) for name, value in named.items())

    eos_ids = set()
    skip_ids = {backend.token_to_id(t) for t in named_special_tokens(config)} - {None}
    if special.get("eos_token") is not None:
        eos_ids.add(backend.token_to_id(special["eos_token"]))
    eos = read_json(path / "generation_config.json").get("eos_token_id")
    eos_ids.update(eos if isinstance(eos, list) else [eos])
    return Tokenizer(backend, read_chat_template(path), special, eos_ids, skip_ids)


def named_special_tokens(config: dict) -> set[str]:
    """The tokens transformers' `all_special_tokens` lists for this tokenizer_config: bos, eos,
    unk, pad (sep, cls, mask), `additional_special_tokens` and the extra special tokens (a list
    in transformers 5, named in a dict in 4). Not every added token flagged `special`."""
    names = {_token_content(config.get(k)) for k in NAMED_SPECIAL}
    for key in ("additional_special_tokens", "extra_special_tokens", "model_specific_special_tokens"):
        value = config.get(key) or []
        names.update(map(_token_content, value.values() if isinstance(value, dict) else value))
    return {n for n in names if isinstance(n, str)}


def _bytes_to_unicode():
    # GPT-2's reversible byte -> printable character table used by byte-level BPE
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tokenizer_from_gguf(path, metadata=None):
    """Build a `tokenizers.Tokenizer` from the byte-level BPE vocabulary of a GGUF file.

    Returns `(tokenizer, chat_template, special_tokens)` where `special_tokens` maps
    `bos_token`/`eos_token`/`unk_token`/`pad_token` to their strings. The layout is SmolLM2's
    tokenizer.json: single digits split off, GPT-2 byte-level regex, control tokens added
    as special tokens.
    """
    if metadata is None:
        from .gguf import read_gguf

        metadata = read_gguf(path)[1]
    md = metadata
    if md.get("tokenizer.ggml.model") != "gpt2":
        raise TokenizerError(
            f"{path}: tokenizer {md.get('tokenizer.ggml.model')!r} is not byte-level BPE (gpt2)"
        )
    tokens = md["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in md["tokenizer.ggml.merges"]]
    types = md["tokenizer.ggml.token_type"].tolist()

    backend = _Backend(
        models.BPE(
            vocab={t: i for i, t in enumerate(tokens)},
            merges=merges,
            dropout=None,
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=False,
        )
    )
    split = [pre_tokenizers.Digits(individual_digits=True)]
    if md.get("tokenizer.ggml.pre") not in ("smollm", None):
        # other byte-level vocabularies: GPT-2's regex alone
        split = []
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    backend.pre_tokenizer = pre_tokenizers.Sequence(split + [byte_level])
    backend.post_processor = processors.ByteLevel(
        add_prefix_space=True, trim_offsets=False, use_regex=True
    )
    backend.decoder = decoders.ByteLevel()
    alphabet = set(_bytes_to_unicode().values())
    control = [t for t, k in zip(tokens, types) if k == GGUF_CONTROL and set(t) <= alphabet]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])

    special = {}
    for name, key in zip(SPECIAL_TOKEN_NAMES, ("bos", "eos", "unknown", "padding")):
        token_id = md.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            special[name] = tokens[int(token_id.item())]
    return backend, md.get("tokenizer.chat_template"), special
