import sys
from pathlib import Path

# tests/make_golden.py and scripts/make_checkpoint.py are importable by the tests.
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "scripts")]
