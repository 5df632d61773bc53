"""The model card (README.md) of a converted folder."""

from .recipes import DESCRIPTIONS


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def model_card(
    source: str,
    is_hub_id: bool,
    dtype: str,
    quantization: dict | None,
    recipe: str | None,
    layers: dict | None,
    size: int,
    quality: dict | None,
    model_ref: str,
) -> str:
    link = f"[{source}](https://huggingface.co/{source})" if is_hub_id else f"`{source}`"
    rows = [("source", link), ("float weights", dtype)]
    if quantization:
        q = quantization
        counts = ", ".join(
            f"{n} at {k} bits" if k != "float" else f"{n} float"
            for k, n in sorted(layers.items(), key=lambda kv: str(kv[0]))
        )
        rows += [
            ("quantization", f"affine, {q['bits']} bits, group size {q['group_size']}"),
            ("recipe", f"`{recipe}`: " + DESCRIPTIONS[recipe].replace("--q-bits", f"{q['bits']} bits")),
            ("layers", counts + " (float: left out by the recipe, or input width not "
             "divisible by the group size)"),
        ]
    rows.append(("size on disk", _size(size)))
    if quality:
        rows.append((
            "quality",
            f"next-token KL {quality['kl']:.4f} nats (max {quality['kl_max']:.3f}), top-1 "
            f"agreement {100 * quality['top1']:.1f}% against the float model over "
            f"{quality['positions']} positions ({quality['prompts']})",
        ))
    elif quantization:
        rows.append(("quality", "not measured (converted with --no-eval)"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    front = "\n".join([
        "---",
        "library_name: mlx",
        *([f"base_model: {source}"] if is_hub_id else []),
        "pipeline_tag: image-text-to-text",
        "tags:",
        "- mlx",
        "- smolvlm",
        "---",
    ])
    return f"""{front}

# {model_ref.rstrip('/').split('/')[-1]}

SmolVLM weights for [MLX](https://github.com/ml-explore/mlx), converted with
`mlx-smolvlm-convert` from mlx_smolvlm.

| | |
|---|---|
{table}

## Use

```bash
pip install mlx-smolvlm
python -m mlx_smolvlm.generate --model {model_ref} --image photo.jpg --prompt "Describe this image."
```

Weights keep the Hugging Face names and `config.json` lists every layer's quantization
under both module layouts, so mlx-vlm (`mlx_vlm.load`) reads the folder as well.
"""
