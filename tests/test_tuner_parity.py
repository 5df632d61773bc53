"""Fine-tuning against the reference: SmolVLM-256M at its real widths (one vision and one text
layer, scripts/conformance_presets.py), float32.

- the loss of a padded batch (multi-turn, one and two images) equals transformers' loss with
  the same labels;
- with LoRA (and DoRA) weights copied from PEFT, one step's adapter gradients equal PEFT's;
- one AdamW step equals torch's.
Adapters cover the decoder's seven projections, the vision layer's six and the connector.
"""

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from conformance_presets import write_checkpoint  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402
from PIL import Image  # noqa: E402

from mlx_smolvlm.loading import load_model  # noqa: E402
from mlx_smolvlm.processing import load_processor  # noqa: E402
from mlx_smolvlm.tuner.datasets import collate, row_messages  # noqa: E402
from mlx_smolvlm.tuner.samples import encode  # noqa: E402
from mlx_smolvlm.tuner.layers import linear_to_lora_layers  # noqa: E402
from mlx_smolvlm.tuner.trainer import loss_fn  # noqa: E402

NAME = "HuggingFaceTB/SmolVLM-256M-Instruct"
LOSS_TOL = 1e-5  # relative
GRAD_TOL = 1e-4  # max |ours - ref| / max |ref| per tensor
ADAM_TOL = 5e-6  # the same, on parameters after AdamW steps from the same gradients (seen: 7e-7)
LORA = {"rank": 8, "alpha": 16, "dropout": 0.0, "train_vision": True, "train_connector": True}


def rel(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tuner_parity")
    ref = write_checkpoint(NAME, root / "legacy", root / "v5").float().eval()
    rng = np.random.default_rng(0)
    for name, (w, h) in {"a.png": (40, 30), "b.png": (24, 48)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name)
    processor = load_processor(root / "legacy")
    rows = [
        {"images": ["a.png"], "messages": [
            {"role": "user", "content": "What is shown?"},
            {"role": "assistant", "content": "Random noise."},
            {"role": "user", "content": "Which colours?"},
            {"role": "assistant", "content": "All of them, evenly spread."}]},
        {"images": ["a.png", "b.png"], "texts": [{"user": "Compare.", "assistant": "Same noise."}]},
    ]
    # one tile per image keeps it fast; tiling is the processor's business (test_conformance)
    samples = [encode(processor, row_messages(r, f"row {i}", root), do_image_splitting=False)
               for i, r in enumerate(rows)]
    assert len(samples[0]) != len(samples[1])
    return root / "legacy", ref, collate(samples, pad_id=2)


def torch_inputs(batch):
    """The batch as transformers takes it: attention mask from the lengths, each row's images
    zero-padded to the batch's most images (which the reference drops, as the processor pads)."""
    ids = np.array(batch.input_ids)
    attention = (np.arange(ids.shape[1]) < np.array(batch.lengths)[:, None]).astype(np.int64)
    images = [(np.array(p), np.array(m)) for p, m in batch.media]
    n = max(len(p) for p, _ in images)
    pixels = np.zeros((len(images), n, *images[0][0].shape[1:]), np.float32)
    masks = np.zeros((len(images), n, *images[0][1].shape[1:]), bool)
    for i, (p, m) in enumerate(images):
        pixels[i, : len(p)], masks[i, : len(m)] = p, m
    return {
        "input_ids": torch.from_numpy(ids.astype(np.int64)),
        "attention_mask": torch.from_numpy(attention),
        "pixel_values": torch.from_numpy(pixels),
        "pixel_attention_mask": torch.from_numpy(masks),
        "labels": torch.from_numpy(np.array(batch.labels).astype(np.int64)),
    }


def test_loss_equals_transformers(setup):
    folder, ref, batch = setup
    labels = np.array(batch.labels)
    assert (labels == -100).all(axis=1).sum() == 0 and [len(p) for p, _ in batch.media] == [1, 2]
    with torch.no_grad():
        want = ref(**torch_inputs(batch)).loss.item()
    got = loss_fn(load_model(folder), batch)[0].item()
    print(f"loss: ours {got:.7f} transformers {want:.7f} rel diff {abs(got - want) / want:.1e}")
    assert abs(got - want) <= LOSS_TOL * abs(want)


def peft_model(ref, targets, use_dora):
    cfg = peft.LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                          target_modules=targets, use_dora=use_dora)
    model = peft.get_peft_model(copy.deepcopy(ref), cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero, which would leave A's gradient zero
                p.normal_(0.0, 0.05)
    return model


def copy_adapter(model, pm):
    """PEFT's adapter weights into ours: A and B transposed, DoRA's magnitude as is."""
    weights = [(k, mx.array(np.ascontiguousarray(v))) for k, v in peft_params(pm).items()]
    model.load_weights(weights, strict=False)


def peft_params(pm, grad=False):
    """PEFT's trainable tensors (or their gradients) under our names and in our layout."""
    names = {"lora_A": "lora_a", "lora_B": "lora_b", "lora_magnitude_vector": "m"}
    out = {}
    for n, p in pm.named_parameters():
        if p.requires_grad:
            path = n[len("base_model.model."):].split(".lora_")[0]
            kind = next(v for k, v in names.items() if f".{k}." in n)
            v = (p.grad if grad else p).detach().numpy()
            out[f"{path}.{kind}"] = v.T if kind != "m" else v
    return out


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_adapter_gradients_and_adamw_step_equal_peft(setup, use_dora):
    folder, ref, batch = setup
    model = load_model(folder)
    model.freeze()
    paths = linear_to_lora_layers(model, -1, LORA, use_dora=use_dora)
    assert len(paths) == 7 + 6 + 1
    pm = peft_model(ref, paths, use_dora)
    copy_adapter(model, pm)

    pm.train()
    loss = pm(**torch_inputs(batch)).loss
    loss.backward()
    want = peft_params(pm, grad=True)
    (ours_loss, _), grads = nn.value_and_grad(model, loss_fn)(model, batch)
    got = dict(tree_flatten(grads))
    assert got.keys() == want.keys() and len(got) == len(paths) * (3 if use_dora else 2)
    diffs = {k: rel(got[k], want[k]) for k in want}
    worst = max(diffs, key=diffs.get)
    print(f"{'dora' if use_dora else 'lora'}: loss rel diff {abs(ours_loss.item() - loss.item()) / loss.item():.1e}, "
          f"grad max rel diff {diffs[worst]:.1e} ({worst}) over {len(diffs)} tensors")
    assert abs(ours_loss.item() - loss.item()) <= LOSS_TOL * loss.item()
    assert diffs[worst] <= GRAD_TOL

    # One AdamW step on both sides from the same (PEFT's) gradients: Adam divides each gradient
    # by its own magnitude, so entries near zero (|g| ~ eps) would amplify the 1e-6-level
    # gradient differences checked above into update differences that say nothing.
    params = [p for p in pm.parameters() if p.requires_grad]
    torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01).step()
    same = [(k, mx.array(np.ascontiguousarray(v))) for k, v in want.items()]
    optim.AdamW(1e-3, weight_decay=0.01, bias_correction=True).update(model, tree_unflatten(same))
    after = dict(tree_flatten(model.trainable_parameters()))
    ref_after = {k: v for k, v in peft_params(pm).items()}
    worst = max(rel(after[k], ref_after[k]) for k in ref_after)
    print(f"after one AdamW step: params max rel diff {worst:.1e}")
    assert worst <= ADAM_TOL


def test_adamw_steps_equal_torch():
    """The optimizer alone: the same gradients for three steps (bias correction, decay)."""
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=(64, 8)).astype(np.float32)
    grads = [rng.normal(size=p0.shape).astype(np.float32) * s for s in (1.0, 1e-3, 10.0)]
    tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    topt = torch.optim.AdamW([tp], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ours = {"w": mx.array(p0)}
    oopt = optim.AdamW(1e-2, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1, bias_correction=True)
    for g in grads:
        tp.grad = torch.from_numpy(g)
        topt.step()
        ours = oopt.apply_gradients({"w": mx.array(g)}, ours)
    d = rel(ours["w"], tp.detach().numpy())
    print(f"AdamW, 3 steps: max rel diff {d:.1e}")
    assert d <= ADAM_TOL


def test_lora_init_is_peft_default():
    """lora_A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), lora_B = 0."""
    from mlx_smolvlm.tuner.layers import LoRALinear

    layer = LoRALinear.from_base(nn.Linear(576, 1536), r=64, scale=2.0)
    a, bound = np.array(layer.lora_a), 1 / np.sqrt(576)
    tl = torch.nn.Linear(576, 64, bias=False)
    torch.nn.init.kaiming_uniform_(tl.weight, a=5**0.5)
    t = tl.weight.detach().numpy()
    print(f"lora_a: max {np.abs(a).max():.4f} std {a.std():.4f}; PEFT max {np.abs(t).max():.4f} std {t.std():.4f}")
    assert np.abs(a).max() <= bound and np.abs(t).max() <= bound
    assert abs(a.std() - bound / 3**0.5) < 0.02 * bound and abs(t.std() - bound / 3**0.5) < 0.02 * bound
    assert not np.array(layer.lora_b).any()
