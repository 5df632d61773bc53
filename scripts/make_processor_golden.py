"""transformers' processor outputs for every case of tests/test_processor.py: the golden that
the suite compares with when torch is not installed.

    python scripts/make_processor_golden.py   # needs transformers; rewrites tests/fixtures/processor/golden.json
"""

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "scripts")]

from make_tokenizer import write_processor_folder  # noqa: E402
from provenance import stamp  # noqa: E402
from test_processor import CASES, GOLDEN, SETUPS, case_inputs, reference_processor, run_reference  # noqa: E402
from test_processor import summarize  # noqa: E402


def main():
    golden, inputs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        refs = {}
        for name, (setup, build, controls) in CASES.items():
            if setup not in refs:
                folder = write_processor_folder(Path(tmp) / setup, **SETUPS[setup])
                refs[setup] = reference_processor(folder, SETUPS[setup]["layout"])
                inputs[f"{setup}/tokenizer.json"] = folder / "tokenizer.json"
            work = Path(tmp) / "cases" / name
            work.mkdir(parents=True)
            golden[name] = summarize(run_reference(refs[setup], build(work), controls))
            inputs.update(case_inputs(name, Path(tmp) / "inputs" / name))
        golden["provenance"] = stamp("scripts/make_processor_golden.py", inputs)
    GOLDEN.write_text(json.dumps(golden, separators=(",", ":")))
    print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
