"""A multi-turn chat that keeps the KV cache between turns: each turn prefills only its
own new tokens. Works with a SmolVLM checkpoint (optionally about an image) or a text-only
GGUF such as SmolLM2.

    python examples/chat.py --image photo.jpg
    python examples/chat.py --model SmolLM2-135M-Instruct.Q4_1.gguf
"""

import argparse

from mlx_smolvlm import load, stream_generate
from mlx_smolvlm.chat_cache import ChatCache
from mlx_smolvlm.sample_utils import make_sampler

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="HuggingFaceTB/SmolVLM-256M-Instruct")
parser.add_argument("--image", help="an image to talk about (first turn)")
args = parser.parse_args()

model, processor = load(args.model)
cache = ChatCache(model)
sampler = make_sampler(temp=0.7, top_p=0.9)
text_only = processor.image_processor is None
messages = []


def turn(role, text, image=None):
    # Text-only chat templates take a string; SmolVLM's take a list of content items.
    if text_only:
        return {"role": role, "content": text}
    items = [{"type": "image", "path": image}] if image else []
    return {"role": role, "content": items + [{"type": "text", "text": text}]}


image = args.image
while True:
    try:
        question = input(">> ")
    except (EOFError, KeyboardInterrupt):
        break
    if not question.strip():
        break
    messages.append(turn("user", question, image))
    image = None
    reply = ""
    for r in stream_generate(model, processor, messages, max_tokens=256, sampler=sampler, prompt_cache=cache):
        print(r.text, end="", flush=True)
        reply += r.text
    print(f"\n[{r.prompt_tokens - r.cached_tokens} new prompt tokens, {r.cached_tokens} from the cache]")
    # Stored as the model generated it, so the next turn reuses the whole cache.
    messages.append(processor.reply_message(reply))
