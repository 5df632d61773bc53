"""Write a SmolVLM folder in mlx-vlm's layout, with mlx-vlm's own converter (test fixtures).

    python scripts/make_mlx_vlm_folder.py smolvlm-256m OUT [--q-bits 4] [--layers 1]

A make_checkpoint.py preset at its real widths with fewer layers gets random weights and a
processor folder (make_tokenizer.py; longest edge = one tile, so an image is one tile), and is
saved in the transformers layout under OUT.src; then `mlx_vlm.convert` writes OUT, as it writes
the mlx-community and docling MLX repos. Needs torch, transformers and mlx-vlm.
"""

import argparse
import contextlib
import io
import json
import shutil
from pathlib import Path

from make_checkpoint import PRESETS, build_model
from make_tokenizer import write_processor_for_model


def write_source(preset: str, dest: Path, layers: int = 1, seed: int = 0) -> Path:
    """transformers-layout float32 checkpoint (`layers` per tower) and processor files at `dest`."""
    build_model(PRESETS[preset], seed, layers).save_pretrained(dest)
    # Hub configs (transformers 4.x) state rope_theta; transformers 5 writes it only under
    # rope_parameters, where mlx-vlm does not look (it would silently use 1e6).
    cfg = json.loads((dest / "config.json").read_text())
    cfg["text_config"]["rope_theta"] = cfg["text_config"]["rope_parameters"]["rope_theta"]
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    write_processor_for_model(dest, json.loads((dest / "config.json").read_text()),
                              longest_edge=PRESETS[preset]["vision_config"]["image_size"])
    return dest


def mlx_vlm_convert(src: Path, dest: Path, q_bits: int | None = None, q_group_size: int = 64) -> Path:
    from mlx_vlm.convert import convert

    shutil.rmtree(dest, ignore_errors=True)
    quant = dict(quantize=True, q_bits=q_bits, q_group_size=q_group_size) if q_bits else {}
    with contextlib.redirect_stdout(io.StringIO()):  # its progress lines
        convert(str(src), str(dest), **quant)
    return dest


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", choices=sorted(PRESETS))
    ap.add_argument("out", type=Path)
    ap.add_argument("--q-bits", type=int)
    ap.add_argument("--q-group-size", type=int, default=64)
    ap.add_argument("--layers", type=int, default=1, help="layers per tower (default 1)")
    args = ap.parse_args(argv)
    src = write_source(args.preset, args.out.with_suffix(".src"), args.layers)
    print(mlx_vlm_convert(src, args.out, args.q_bits, args.q_group_size))


if __name__ == "__main__":
    main()
