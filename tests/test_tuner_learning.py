"""Learning through the image: the same question about three cards, three answers. A LoRA
adapter trained by `python -m mlx_smolvlm.lora` on a SmolVLM-256M-shaped checkpoint with the
real SmolLM2-135M decoder (scripts/make_tuning_fixtures.py) must answer each card exactly,
greedily, with every generated token ahead of the runner-up by MARGIN nats; the base model
must not. Only the image tells the cards apart, so the adapter learned to read it.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from make_tuning_fixtures import CARDS, QUESTION, write_cards, write_real_decoder_vlm

from mlx_smolvlm.generate import load, stream_generate
from mlx_smolvlm.tuner.layers import linear_to_lora_layers

ITERS = 30  # loss ~0.08 and margins ~1.5 nats at 30 (lr 1e-3, rank 8, last 8 layers)
MARGIN = 0.5  # nats between the chosen token and the next best, at every step


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("learning")
    model, cards = write_real_decoder_vlm(root / "model"), write_cards(root / "cards")
    adapter = root / "adapter"
    cmd = [sys.executable, "-m", "mlx_smolvlm.lora", "--model", str(model), "--train", "--data", str(cards),
           "--iters", str(ITERS), "--batch-size", "3", "--learning-rate", "1e-3", "--num-layers", "8",
           "--lora-rank", "8", "--lora-alpha", "16", "--no-split", "--steps-per-report", "10",
           "--steps-per-eval", "1000", "--adapter-path", str(adapter)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    print(r.stdout)
    return model, cards, adapter, r.stdout


def answers(model, processor, cards):
    """{card: (greedy text, smallest top-1 minus top-2 log-prob over its tokens)}."""
    out = {}
    for name in CARDS:
        msgs = [{"role": "user", "content": [{"type": "image", "path": str(cards / f"{name}.png")},
                                             {"type": "text", "text": QUESTION}]}]
        tokens, gaps = [], []
        for r in stream_generate(model, processor, msgs, max_tokens=12, do_image_splitting=False):
            top2 = np.sort(np.array(r.logprobs, dtype=np.float64))[-2:]
            tokens.append(r.token)
            gaps.append(top2[1] - top2[0])
        out[name] = (processor.tokenizer.decode(tokens), min(gaps))
    return out


def adapted(model_path, adapter):
    model, processor = load(model_path)
    config = json.loads((adapter / "adapter_config.json").read_text())
    model.freeze()
    linear_to_lora_layers(model, config["num_layers"], config["lora_parameters"],
                          use_dora=config["fine_tune_type"] == "dora")
    model.load_weights(str(adapter / "adapters.safetensors"), strict=False)
    model.eval()
    return model, processor


def test_adapter_answers_each_card_from_its_image(trained):
    model_path, cards, adapter, log = trained
    lines = [ln for ln in log.splitlines() if "train loss" in ln]
    assert lines and all(k in lines[0] for k in ("lr", "tokens/s", "peak mem"))
    final = float(lines[-1].split("train loss ")[1].split(",")[0])
    assert final < 0.3, log

    base = answers(*load(model_path), cards)
    got = answers(*adapted(model_path, adapter), cards)
    for name, (_, answer) in CARDS.items():
        print(f"{name}: base {base[name][0]!r}; adapted {got[name][0]!r} (min margin {got[name][1]:.2f} nats)")
        assert answer not in base[name][0]
        assert got[name][0] == f" {answer}<end_of_utterance>"
        assert got[name][1] >= MARGIN


def test_fused_folder_and_its_8bit_conversion_answer_as_the_adapter(trained, tmp_path):
    """The trained adapter through --adapter-path (load_adapters), merged by
    `python -m mlx_smolvlm.fuse`, and that folder converted to 8 bits: the same answers, each
    token still ahead by MARGIN."""
    from mlx_smolvlm.convert.converter import convert
    from mlx_smolvlm.fuse import main as fuse_main

    model_path, cards, adapter, _ = trained
    fused = tmp_path / "fused"
    assert fuse_main(["--model", str(model_path), "--adapter-path", str(adapter), "--save-path", str(fused)]) == 0
    q8 = convert(str(fused), tmp_path / "q8", quantize=True, q_bits=8, evaluate=False)
    for what, folder, adapter_path in (("--adapter-path", model_path, adapter), ("fused", fused, None),
                                       ("fused, 8-bit", q8, None)):
        got = answers(*load(folder, adapter_path=adapter_path), cards)
        for name, (_, answer) in CARDS.items():
            print(f"{name}, {what}: {got[name][0]!r} (min margin {got[name][1]:.2f} nats)")
            assert got[name][0] == f" {answer}<end_of_utterance>"
            assert got[name][1] >= MARGIN
