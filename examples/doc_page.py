"""Convert a document page image to DocTags (and to Markdown when docling-core is installed).

    python examples/doc_page.py page.png
    python examples/doc_page.py page.png --model ibm-granite/granite-docling-258M-mlx --out page.md

Works with SmolDocling-256M-preview and granite-docling-258M, from their transformers or MLX
(mlx-vlm) folders. DocTags are added special tokens, so they are kept in the streamed text.
"""

import argparse
from pathlib import Path

from PIL import Image

from mlx_smolvlm import load, stream_generate

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("image", help="page image (path)")
parser.add_argument("--model", default="ibm-granite/granite-docling-258M-mlx")
parser.add_argument("--prompt", default="Convert this page to docling.")
parser.add_argument("--max-tokens", type=int, default=8192)
parser.add_argument("--out", type=Path, help="write Markdown here (needs docling-core)")
args = parser.parse_args()

model, processor = load(args.model)
page = Image.open(args.image).convert("RGB")
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.prompt}]}]
prompt = processor.apply_chat_template(messages)
doctags = ""
for r in stream_generate(model, processor, prompt, [page], max_tokens=args.max_tokens,
                         skip_special_tokens=False, stop=["</doctag>"], clip_to_context=True):
    print(r.text, end="", flush=True)
    doctags += r.text
print(f"\n[{r.generation_tokens} tokens, {r.generation_tps:.1f} tokens/s, finish: {r.finish_reason}]")

try:
    from docling_core.types.doc import DoclingDocument
    from docling_core.types.doc.document import DocTagsDocument
except ImportError:
    print("(install docling-core for Markdown output)")
else:
    # the stop string is not part of the text; DocTags readers expect the closing tag
    pairs = DocTagsDocument.from_doctags_and_image_pairs([doctags + "</doctag>"], [page])
    markdown = DoclingDocument.load_from_doctags(pairs, document_name=Path(args.image).stem).export_to_markdown()
    if args.out:
        args.out.write_text(markdown)
    print(markdown)
