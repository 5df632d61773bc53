"""The published SmolVLM-family checkpoints, as tests/test_conformance.py rebuilds them.

Every value below is the published one (config.json, preprocessor_config.json,
processor_config.json, tokenizer) with where it was read; only the layer counts are cut
(`LAYERS`) so a checkpoint runs on a CPU. Weights are random (make_checkpoint.randomize).
`write_checkpoint(name, legacy, v5)` writes one checkpoint twice: in the Hub's legacy layout
(preprocessor_config.json + processor_config.json + chat_template.json, as those repos have
it) and in the layout transformers 5's own `save_pretrained` writes (nested image/video
processors in processor_config.json, chat_template.jinja, `extra_special_tokens` as a list).

    python scripts/conformance_presets.py smolvlm2-256m /tmp/legacy /tmp/v5

Sources (cited per value as [key]):
  [smolvlm2-500m-card]  SmolVLM2-500M-Video-Instruct config.json, preprocessor_config.json and
      processor_config.json, quoted "verbatim from the model card" in a public test helper
      (found by the code search; its repository is not named there).
  [smolvlm-2.2b-cfg]    SmolVLM-Instruct config.json quoted in two public Rust loaders' tests
      (code search; repositories not named): idefics3, image_token_id 49153, image_seq_len 81,
      scale_factor 3, untied, text 2048/8192/24 layers/32 heads/32 kv/head_dim 64,
      rope_theta 273768, vocab 49155; vision 1152/4304/27/16 heads/patch 14/384.
  [idefics3-256m-cfg]   a SmolVLM-256M-style idefics3 config in a public Rust loader's test
      (code search): image_token_id 49190, scale 4, untied, text 576/1536/30/9/3, vocab 49280,
      rope_theta 100000, max_position_embeddings 8192; vision 768/3072/12/12/512/16.
  [smolvlm-256m-card]   huggingface.co/HuggingFaceTB/SmolVLM-256M-Instruct model card: 64 visual
      tokens per 512x512 patch, 93M SigLIP base patch-16/512 encoder, SmolLM2-135M decoder.
  [smolvlm-2.2b-card]   huggingface.co/HuggingFaceTB/SmolVLM-Instruct model card: 81 visual tokens
      per 384x384 patch.
  [granite-cfg]         ibm-granite/granite-docling-258M config.json, tokenizer_config.json,
      added_tokens.json and chat_template.jinja, as mirrored in GitHub
      pgadet-wq/granite-docling-258M@587b823 ("Duplicate from ibm-granite/granite-docling-258M").
  [granite-card]        its model card: Idefics3 with siglip2-base-patch16-512 and a Granite 165M LLM.
  [smollm2]             SmolLM2-135M/360M config.json (hidden 576/960, 30/32 layers, 9/15 heads,
      3/5 kv heads, mlp 1536/2560, rope_theta 100000, tied), the decoders of the 256M/500M models.
  [hf-defaults]         transformers 5.24 SmolVLMVisionConfig / Idefics3VisionConfig defaults
      (intermediate_size 3072, 12 layers), used where a published vision_config omits a key.
  [assumed]             not confirmed from any source reachable here; see UNCONFIRMED.
"""

import argparse
import json
import sys
import zlib
from pathlib import Path

from make_checkpoint import SIGLIP_B16, SIGLIP_SO400M, TEXT_1_7B, TEXT_135M, TEXT_360M, build_model
from make_tokenizer import CHAT_TEMPLATE, VIDEO_CLAUSE, tokenizer_with_added, write_processor_folder

# One layer each: the widths are what differ between models (tests/fixtures' tiny models cover
# layer stacking); a second 2048-wide text layer would add ~100 GFLOP per 2.2B prompt.
LAYERS = {"vision": 1, "text": 1}

# Processor settings (preprocessor_config.json `size`/`max_image_size`, processor_config.json
# `image_seq_len`, SmolVLM2's `video_sampling`).
PROC_512 = dict(tile=512, longest_edge=2048, image_seq_len=64)  # [smolvlm2-500m-card]
PROC_384 = dict(tile=384, longest_edge=1536, image_seq_len=81)  # [smolvlm-2.2b-cfg] 81; 4 x 384 [assumed]
VIDEO_512 = {"fps": 1, "max_frames": 64, "video_size": {"longest_edge": 512}}  # [smolvlm2-500m-card]
VIDEO_384 = {"fps": 1, "max_frames": 64, "video_size": {"longest_edge": 384}}  # [assumed]

# granite-docling's added tokens, ids 100256.. in order [granite-cfg] (tokenizer_config.json
# added_tokens_decoder; <end_of_utterance> 100352 from added_tokens.json).
ROWS_COLS_4 = [f"<row_{r}_col_{c}>" for r in range(1, 5) for c in range(1, 5)]
GRANITE_ADDED = (
    ["<|pad|>", "<|end_of_text|>", *ROWS_COLS_4[:2], "<text>", *ROWS_COLS_4[2:5],
     "<|start_of_role|>", "<|end_of_role|>", "</title>", *ROWS_COLS_4[5:7], "<title>", "<image>",
     "<caption>", "</caption>", "<footnote>", "</footnote>", "<formula>", "</formula>",
     "<list_item>", "</list_item>", "<page_footer>", "</page_footer>", "<page_header>",
     "</page_header>", "<picture>", "</picture>",
     *[f"{t}section_header_level_{i}>" for i in range(1, 7) for t in ("<", "</")],
     "<otsl>", "</otsl>", "<checkbox_selected>", "</checkbox_selected>", "<checkbox_unselected>",
     "</checkbox_unselected>", "<form>", "</form>", "<key_value_region>", "</key_value_region>",
     "<key_", "</key_", "<value_", "</value_", "<link_", "<chart>", "</chart>", "<page_break>",
     "<smiles>", "</smiles>", "</text>", "<paragraph>", "</paragraph>", "<references>",
     "</references>", "<ordered_list>", "</ordered_list>", "<unordered_list>", "</unordered_list>",
     "<group>", "<doctag>", "</doctag>", "<rec_", "<fcel>", "<ecel>", "<lcel>", "<ucel>", "<xcel>",
     "<nl>", "<ched>", "<rhed>", "<|unk|>", "<fake_token_around_image>", "<global-img>",
     *ROWS_COLS_4[7:], "<code>", "</code>", "<end_of_utterance>"]
)
GRANITE_TEMPLATE = (  # [granite-cfg] chat_template.jinja
    "{%- for message in messages -%}\n"
    "{{- '<|start_of_role|>' + message['role'] + '<|end_of_role|>' -}}\n"
    "{%- if message['content'] is string -%}\n{{- message['content'] -}}\n{%- else -%}\n"
    "{%- for part in message['content'] -%}\n{%- if part['type'] == 'text' -%}\n"
    "{{- part['text'] -}}\n{%- elif part['type'] == 'image' -%}\n{{- '<image>' -}}\n{%- endif -%}\n"
    "{%- endfor -%}\n{%- endif -%}\n{{- '<|end_of_text|>\n' -}}\n{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n{{- '<|start_of_role|>assistant' -}}\n"
    "{%- if controls -%}{{- ' ' + controls | tojson() -}}{%- endif -%}\n"
    "{{- '<|end_of_role|>' -}}\n{%- endif -%}\n"
)


def vlm(model_type, scale_factor, image_token_id, vision, text, tie=False, **ids):
    return dict(model_type=model_type, scale_factor=scale_factor, image_token_id=image_token_id,
                tie_word_embeddings=tie, vision_config=vision, text_config=text, **ids)


PRESETS = {
    # hub id: (config, tokenizer layout of make_tokenizer or "granite", processor, video_sampling)
    "HuggingFaceTB/SmolVLM2-256M-Video-Instruct": (
        vlm("smolvlm", 4, 49190, SIGLIP_B16, TEXT_135M),  # as [smolvlm2-500m-card] with [smollm2] 135M
        "smolvlm2", PROC_512, VIDEO_512),
    "HuggingFaceTB/SmolVLM-256M-Instruct": (
        vlm("idefics3", 4, 49190, SIGLIP_B16, TEXT_135M),  # [idefics3-256m-cfg] [smolvlm-256m-card]
        "smolvlm", PROC_512, None),
    "HuggingFaceTB/SmolVLM-500M-Instruct": (
        vlm("idefics3", 4, 49190, SIGLIP_B16, TEXT_360M),  # [smollm2] decoder; rest as 256M [assumed]
        "smolvlm", PROC_512, None),
    "HuggingFaceTB/SmolVLM-Instruct": (
        vlm("idefics3", 3, 49153, SIGLIP_SO400M, TEXT_1_7B),  # [smolvlm-2.2b-cfg]
        "idefics3-2.2b", PROC_384, None),
    "HuggingFaceTB/SmolVLM2-500M-Video-Instruct": (
        vlm("smolvlm", 4, 49190, SIGLIP_B16, TEXT_360M),  # [smolvlm2-500m-card]
        "smolvlm2", PROC_512, VIDEO_512),
    "HuggingFaceTB/SmolVLM2-2.2B-Instruct": (
        # vocab 49280 (the 256M-style added tokens) and rope_theta 273768 [assumed]
        vlm("smolvlm", 3, 49190, SIGLIP_SO400M, dict(TEXT_1_7B, vocab_size=49280)),
        "smolvlm2", PROC_384, VIDEO_384),
    "ds4sd/SmolDocling-256M-preview": (
        # SmolVLM-256M's geometry and tokenizer layout [assumed]; its DocTags tokens not modelled
        vlm("idefics3", 4, 49190, SIGLIP_B16, TEXT_135M),
        "smolvlm", PROC_512, None),
    "ibm-granite/granite-docling-258M": (
        vlm("idefics3", 4, 100270, SIGLIP_B16, dict(TEXT_135M, vocab_size=100352), tie=True,
            bos_token_id=100264, eos_token_id=100257, pad_token_id=100257),  # [granite-cfg]
        "granite", PROC_512, None),  # processor settings [assumed]: preprocessor config not mirrored
}

UNCONFIRMED = [
    "SmolVLM-500M-Instruct: model_type, image_token_id, tie_word_embeddings taken as the 256M's",
    "SmolVLM-Instruct: size.longest_edge 1536 (4 x 384); its chat template is taken as the 256M's",
    "SmolVLM2-2.2B-Instruct: rope_theta (273768, SmolVLM-Instruct's), vocab 49280, image token 49190, "
    "processor 1536/384/81, video_sampling (fps 1, 64 frames, 384)",
    "SmolVLM2-256M-Video-Instruct: processor values taken as SmolVLM2-500M's",
    "SmolDocling-256M-preview: every value taken as SmolVLM-256M-Instruct's; DocTags tokens not modelled",
    "granite-docling-258M: preprocessor settings (2048/512/64); text vocabulary below id 100256 "
    "(SmolLM2's BPE plus unreachable fillers: Granite's vocab/merges are not reachable here)",
]


def config_json(name: str) -> dict:
    """The checkpoint's config.json as the Hub has it, layer counts cut to LAYERS."""
    config = json.loads(json.dumps(PRESETS[name][0]))
    config["vision_config"]["num_hidden_layers"] = LAYERS["vision"]
    config["text_config"]["num_hidden_layers"] = LAYERS["text"]
    prefix = "SmolVLM" if config["model_type"] == "smolvlm" else "Idefics3"
    return {"architectures": [f"{prefix}ForConditionalGeneration"], **config}


def write_legacy_processor(name: str, dest: Path, gguf=None):
    _, layout, proc, video = PRESETS[name]
    config = PRESETS[name][0]
    if layout != "granite":
        return write_processor_folder(dest, layout, proc["tile"], proc["image_seq_len"],
                                      proc["longest_edge"], config["text_config"]["vocab_size"],
                                      config["image_token_id"], gguf, video,
                                      template_file="chat_template.json")
    # the 256M-style image processor files, then granite's tokenizer, its config and template
    write_processor_folder(dest, "smolvlm", proc["tile"], proc["image_seq_len"], proc["longest_edge"],
                           gguf=gguf, template_file="chat_template.json")
    start = 100256
    added = {t: start + i for i, t in enumerate(GRANITE_ADDED)}
    tokenizer_with_added(added, start, gguf).save(str(dest / "tokenizer.json"))
    (dest / "tokenizer_config.json").write_text(json.dumps({  # [granite-cfg]
        "add_bos_token": False, "add_prefix_space": False,
        "additional_special_tokens": ["<fake_token_around_image>", "<image>"],
        "bos_token": "<|start_of_role|>", "clean_up_tokenization_spaces": False,
        "eos_token": "<|end_of_text|>", "extra_special_tokens": {}, "model_max_length": 8192,
        "pad_token": "<|end_of_text|>", "processor_class": "Idefics3Processor",
        "tokenizer_class": "GPT2Tokenizer", "unk_token": "<|unk|>",
    }, indent=2))
    (dest / "chat_template.json").write_text(json.dumps({"chat_template": GRANITE_TEMPLATE}))
    return dest


def reference_processor(folder: Path, model_type: str):
    """transformers' own processor for `folder` (PIL image processor). SmolVLM2's video processor
    is built from its class directly, which needs no torchvision until it resizes frames;
    ProcessorMixin's class check, which does, is skipped."""
    from transformers import AutoTokenizer

    if model_type == "idefics3":
        from transformers import Idefics3Processor as cls
        from transformers.models.idefics3.image_processing_pil_idefics3 import (
            Idefics3ImageProcessorPil as image_cls,
        )
    else:
        from transformers import SmolVLMProcessor as cls
        from transformers.models.smolvlm.image_processing_pil_smolvlm import (
            SmolVLMImageProcessorPil as image_cls,
        )
    kwargs = {}
    if model_type == "smolvlm":
        from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

        kwargs["video_processor"] = SmolVLMVideoProcessor.from_pretrained(folder)

    class Processor(cls):
        def check_argument_for_proper_class(self, name, arg):
            if name != "video_processor":
                return super().check_argument_for_proper_class(name, arg)

    Processor.__name__ = cls.__name__
    proc_config = json.loads((folder / "processor_config.json").read_text())
    template = folder / "chat_template.jinja"
    if template.is_file():
        template = template.read_text()
    else:
        template = json.loads((folder / "chat_template.json").read_text())["chat_template"]
    return Processor(image_processor=image_cls.from_pretrained(folder),
                     tokenizer=AutoTokenizer.from_pretrained(folder),
                     image_seq_len=proc_config["image_seq_len"], chat_template=template, **kwargs)


def write_checkpoint(name: str, legacy: Path, v5: Path, gguf=None):
    """Build `name` with transformers, save it in both layouts; returns the torch model.
    The seed follows the name, so models of equal shapes still get different weights."""
    config = config_json(name)
    model = build_model(config, zlib.crc32(name.encode()))
    model.save_pretrained(v5)
    legacy.mkdir(parents=True, exist_ok=True)
    for f in v5.glob("*.*"):  # the same weight files, linked instead of written twice
        (legacy / f.name).hardlink_to(f)
    (legacy / "config.json").unlink()
    (legacy / "config.json").write_text(json.dumps(config, indent=2))
    write_legacy_processor(name, legacy, gguf)
    reference_processor(legacy, config["model_type"]).save_pretrained(v5)
    return model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("name", choices=sorted(PRESETS))
    ap.add_argument("legacy", type=Path)
    ap.add_argument("v5", type=Path)
    a = ap.parse_args(argv)
    write_checkpoint(a.name, a.legacy, a.v5)
    print(a.legacy, a.v5, file=sys.stderr)


if __name__ == "__main__":
    main()
