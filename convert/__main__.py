"""python -m mlx_smolvlm.convert: a SmolVLM / SmolVLM2 checkpoint -> an MLX folder (optionally quantized)."""

import argparse
import signal
import sys

from mlx_smolvlm.errors import CheckpointError, ConvertError

from .converter import DTYPES, convert
from .recipes import BITS, DESCRIPTIONS, GROUP_SIZES

EPILOG = "recipes:\n" + "\n".join(f"  {k:8} {v}" for k, v in DESCRIPTIONS.items())


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m mlx_smolvlm.convert",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--hf-path", required=True, help="Hub repo id or local folder to convert")
    ap.add_argument("--mlx-path", default="mlx_model", help="output folder (default: mlx_model)")
    ap.add_argument("--dtype", choices=DTYPES, help="dtype of the float weights (default: as stored)")
    ap.add_argument("-q", "--quantize", action="store_true", help="quantize the weights")
    ap.add_argument("--q-bits", type=int, choices=BITS, help="bits per weight (default: 4)")
    ap.add_argument("--q-group-size", type=int, choices=GROUP_SIZES, help="group size (default: 64)")
    ap.add_argument("--recipe", choices=list(DESCRIPTIONS), help="what to quantize (default: all)")
    ap.add_argument("--no-eval", action="store_true", help="skip measuring quality for the model card")
    ap.add_argument("--upload-repo", help="Hub repo to upload the converted folder to")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --mlx-path")
    args = ap.parse_args(argv)

    # A terminated run unwinds like Ctrl-C, so its partial output is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        convert(
            args.hf_path,
            args.mlx_path,
            dtype=args.dtype,
            quantize=args.quantize,
            q_bits=args.q_bits,
            q_group_size=args.q_group_size,
            recipe=args.recipe,
            upload_repo=args.upload_repo,
            overwrite=args.overwrite,
            evaluate=not args.no_eval,
        )
    except (CheckpointError, ConvertError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
