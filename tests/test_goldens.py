"""A golden that disagrees with the live reference says which of ours, the reference and the
golden moved (tests/goldens.py), and every committed golden records what it was made from."""

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_agrees, check_inputs
from provenance import read_stamp, stamp

FIXTURES = Path(__file__).parent / "fixtures"
RECORD = stamp("scripts/make_x.py", {"clip": b"bytes"})


def same(a, b):
    return a == b


@pytest.mark.parametrize("ours,live,golden,says", [
    (1, 1, 2, "the golden is stale"),
    (1, 2, 1, "the live reference moved"),
    (2, 1, 1, "ours moved"),
    (1, 2, 3, "all differ"),
    (1, None, 2, "no live reference here"),
])
def test_names_what_moved(ours, live, golden, says):
    with pytest.raises(AssertionError, match=says):
        assert_agrees("x", ours, live=live, golden=golden, same=same, record=RECORD)
    assert_agrees("x", 1, live=1, golden=1, same=same, record=RECORD)
    assert_agrees("x", 1, live=None, golden=1, same=same, record=RECORD)


def test_inputs_checked():
    check_inputs("x", RECORD, {"clip": b"bytes"})
    with pytest.raises(AssertionError, match="made from other inputs.*clip.*regenerate with scripts/make_x.py"):
        check_inputs("x", RECORD, {"clip": b"other bytes"})


def test_every_golden_has_provenance():
    records = {
        "video/golden.json": json.loads((FIXTURES / "video" / "golden.json").read_text()).get("provenance"),
        "processor/golden.json": json.loads((FIXTURES / "processor" / "golden.json").read_text()).get("provenance"),
        "generate_golden.json": json.loads((FIXTURES / "generate_golden.json").read_text()).get("provenance"),
    }
    for case, value in json.loads((FIXTURES / "video" / "generation.json").read_text()).items():
        records[f"video/generation.json[{case}]"] = value.get("provenance")
    for name in ("tiny-idefics3", "tiny-smolvlm"):
        records[f"{name}/golden.npz"] = read_stamp(np.load(FIXTURES / name / "golden.npz"))
    for name, record in records.items():
        assert record and record["inputs"] and "transformers" in record["versions"], name
        print(f"{name}: {record['made_by']}, transformers {record['versions']['transformers']}, "
              f"torch {record['versions'].get('torch')}")
