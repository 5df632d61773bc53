"""examples/finetune_cards.py runs top to bottom offline: the real SmolLM2-135M decoder learns
three (card image, same question) -> different answer pairs through a LoRA adapter, and the
adapter, the fused folder and its 8-bit conversion all give the learned answers greedily.

Refresh the README figure with
    SMOLVLM_FIGURES=examples/figures python -m pytest tests/test_finetune_example.py
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "finetune_cards.py"


def test_finetune_example_learns_through_the_image(tmp_path):
    figures = Path(os.environ.get("SMOLVLM_FIGURES") or tmp_path).resolve()
    env = dict(os.environ, SMOLVLM_FIGURES=str(figures), MPLBACKEND="Agg")
    tic = time.perf_counter()
    p = subprocess.run([sys.executable, str(EXAMPLE), "--work", str(tmp_path / "work")],
                       capture_output=True, text=True, env=env, timeout=1200)
    print(f"\nexample ran in {time.perf_counter() - tic:.0f} s")
    assert p.returncode == 0, p.stderr[-3000:]
    print(p.stdout[-1200:])
    r = json.loads((tmp_path / "work" / "result.json").read_text())
    # Before: the base model cannot know the cards' names (its vision tower is random).
    assert not any(e in b for e, b in zip(r["expected"], r["before"])), r["before"]
    assert r["adapter"] == r["expected"], r["adapter"]
    assert r["fused"] == r["expected"] and r["8bit"] == r["expected"], (r["fused"], r["8bit"])
    assert r["losses"][-1] < r["losses"][0] / 10
    assert (figures / "finetune_cards" / "loss.png").is_file()
