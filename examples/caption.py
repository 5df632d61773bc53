"""Caption an image, streaming the answer.

    python examples/caption.py photo.jpg
    python examples/caption.py https://example.com/cat.png --model path/to/SmolVLM-256M-Instruct
"""

import argparse

from mlx_smolvlm import load, stream_generate

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("image", help="path or URL")
parser.add_argument("--model", default="HuggingFaceTB/SmolVLM-256M-Instruct")
args = parser.parse_args()

model, processor = load(args.model)
messages = [
    {
        "role": "user",
        "content": [
            {"type": "image", "path": args.image},
            {"type": "text", "text": "Describe this image in one sentence."},
        ],
    }
]
for r in stream_generate(model, processor, messages, max_tokens=100):
    print(r.text, end="", flush=True)
print(f"\n[{r.prompt_tokens} prompt tokens, {r.generation_tps:.1f} tokens/s, {r.peak_memory:.2f} GB peak]")
