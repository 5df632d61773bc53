"""Ask one question about two images. Each image is one global tile here
(`do_image_splitting=False`): 64 image tokens each instead of up to 17 x 64.

    python examples/compare_two_images.py before.jpg after.jpg
"""

import argparse

from mlx_smolvlm import generate, load

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("images", nargs=2, help="two paths or URLs")
parser.add_argument("--question", default="What is different between these two images?")
parser.add_argument("--model", default="HuggingFaceTB/SmolVLM-256M-Instruct")
args = parser.parse_args()

model, processor = load(args.model)
content = [{"type": "image", "path": p} for p in args.images]
messages = [{"role": "user", "content": content + [{"type": "text", "text": args.question}]}]
print(processor.preflight(messages, do_image_splitting=False))
answer = generate(model, processor, messages, max_tokens=200, do_image_splitting=False, verbose=True)
