"""Decoder LMs built from saved HF checkpoints generate exactly HF's greedy tokens."""

from __future__ import annotations

import pytest
import torch
import transformers

from distattn.models import DecoderLM, generate, generate_greedy

from hf_reference import _common

PROMPTS = [[5, 17, 3, 44, 9, 1, 30, 2, 8, 61, 12], [7, 7, 21, 90], [33, 2, 5, 80, 14, 6, 3]]
NEW_TOKENS = 12


def family_checkpoint(family: str, path, **overrides: object) -> transformers.PreTrainedModel:
    """A tiny random checkpoint of `family` (config fields `overrides` changed) saved with save_pretrained;
    returns the HF model (fp64)."""
    configs = {
        "llama": transformers.LlamaConfig(**_common(attention_bias=True)),
        "qwen2": transformers.Qwen2Config(**_common()),
        "qwen3": transformers.Qwen3Config(**_common(tie_word_embeddings=True)),
        "mistral": transformers.MistralConfig(**_common(sliding_window=6)),
        # alternating sliding (6) / full layers, sinks, YaRN, attention biases, 4 experts top-2 with biases
        "gpt_oss": transformers.GptOssConfig(**_common(
            intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, sliding_window=6,
            rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                             "original_max_position_embeddings": 512, "rope_theta": 150000.0})),
        # local sliding-window (6) and global layers with their own RoPE bases, (1 + w) QK-norm, four norms per layer,
        # scaled embeddings, GeGLU, query_pre_attn_scalar, soft-capped logits
        "gemma3": transformers.Gemma3TextConfig(**_common(
            sliding_window=6, layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=24, final_logit_softcapping=30.0,
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                             "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}})),
        # chunked attention (6) on RoPE layers, NoPE layers with temperature tuning, L2 QK-norm, interleaved RoPE,
        # MoE layers (4 experts, top-1 sigmoid router + shared expert) between dense ones
        "llama4": transformers.Llama4TextConfig(**_common(
            num_hidden_layers=4, intermediate_size=32, intermediate_size_mlp=96, num_local_experts=4, num_experts_per_tok=1,
            interleave_moe_layer_step=2, attention_chunk_size=6, use_qk_norm=True, attn_temperature_tuning=True, floor_scale=4,
            attn_scale=0.1, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
    }
    for key, value in overrides.items():
        setattr(configs[family], key, value)
    torch.manual_seed(0)
    extra = {"experts_implementation": "eager"} if family in ("gpt_oss", "llama4") else {}  # HF's grouped_mm experts take no fp64
    model = transformers.AutoModelForCausalLM.from_config(configs[family], attn_implementation="eager", **extra)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.5 if "embed" in name else 0.15)
            elif family == "gemma3":  # Gemma's norms weigh (1 + w): w = 0 would hide a missing offset
                p.normal_(0.0, 0.3)
    model.save_pretrained(path)
    return model.double().eval()


def new_tokens(family: str) -> int:
    """Decode crosses the window (6) several times in the families this release added."""
    return 24 if family in ("gpt_oss", "gemma3", "llama4") else NEW_TOKENS


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "gpt_oss", "gemma3", "llama4"])
def test_greedy_generation_matches_hf_generate(family: str, tmp_path) -> None:
    hf = family_checkpoint(family, tmp_path)
    ours = DecoderLM.from_pretrained(tmp_path, dtype=torch.float64)  # fp64 on both sides: no argmax ties
    n = new_tokens(family)
    got = generate_greedy(ours, PROMPTS, max_new_tokens=n)
    for prompt, tokens in zip(PROMPTS, got):
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)[0, len(prompt):]
        assert tokens == expected.tolist()
    alone = generate_greedy(ours, PROMPTS[1:2], max_new_tokens=n)  # one row: few tokens per step (MoE: per-token experts)
    assert alone[0] == got[1]


def test_stop_tokens_end_a_row(tmp_path) -> None:
    family_checkpoint("llama", tmp_path)
    model = DecoderLM.from_pretrained(tmp_path, dtype=torch.float64)
    free = generate_greedy(model, PROMPTS, max_new_tokens=NEW_TOKENS, stop_tokens=[])
    stop = free[0][3]
    stopped = generate_greedy(model, PROMPTS, max_new_tokens=NEW_TOKENS, stop_tokens=[stop])
    assert stopped[0] == free[0][: free[0].index(stop) + 1]
    for row, tokens in zip(free, stopped):
        assert tokens == row[: row.index(stop) + 1] if stop in row else tokens == row


def test_generation_config_end_tokens_stop_rows_as_in_hf_generate(tmp_path) -> None:
    """Instruct checkpoints keep their end-of-turn token in generation_config.json: rows stop there, as HF's do."""
    hf = family_checkpoint("llama", tmp_path)
    free = generate_greedy(DecoderLM.from_pretrained(tmp_path, dtype=torch.float64), PROMPTS, max_new_tokens=NEW_TOKENS, stop_tokens=[])
    end = free[0][4]  # a token row 0 produces: config.json's eos_token_id is another
    transformers.GenerationConfig(eos_token_id=[end, 96]).save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    got = generate_greedy(DecoderLM.from_pretrained(tmp_path, dtype=torch.float64), PROMPTS, max_new_tokens=NEW_TOKENS)
    assert got[0] == free[0][: free[0].index(end) + 1]
    for prompt, tokens in zip(PROMPTS, got):
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)[0, len(prompt):]
        assert tokens == expected.tolist()


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt_oss", "gemma3", "llama4"])
def test_prompt_lookup_speculation_equals_greedy(family: str, tmp_path) -> None:
    family_checkpoint(family, tmp_path)
    model = DecoderLM.from_pretrained(tmp_path, dtype=torch.float64)
    repetitive = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [9, 10, 9, 10, 9], [3, 4, 5]]  # n-grams recur: drafts get proposed
    plain = generate(model, repetitive, max_new_tokens=20, stop_tokens=[])
    spec = generate(model, repetitive, max_new_tokens=20, stop_tokens=[], draft="prompt_lookup", draft_len=4)
    assert spec.tokens == plain.tokens
    assert spec.accepted_drafts > 0  # drafts were accepted, and still the tokens are greedy's


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_draft_model_speculation_equals_greedy(family: str, tmp_path) -> None:
    """A draft model proposes 3 tokens a step: with the target itself as the draft every proposal is
    accepted; with an unrelated 1-layer model most are rejected; the tokens are greedy's either way."""
    hf = family_checkpoint(family, tmp_path / "target")
    model = DecoderLM.from_pretrained(tmp_path / "target", dtype=torch.float64)
    small = hf.config.__class__(**{**hf.config.to_dict(), "num_hidden_layers": 1})
    torch.manual_seed(7)
    transformers.AutoModelForCausalLM.from_config(small).save_pretrained(tmp_path / "draft")
    other = DecoderLM.from_pretrained(tmp_path / "draft", dtype=torch.float64)
    plain = generate(model, PROMPTS, max_new_tokens=NEW_TOKENS, stop_tokens=[])  # greedy == HF generate: tested above
    itself = generate(model, PROMPTS, max_new_tokens=NEW_TOKENS, stop_tokens=[], draft="model", draft_model=model, draft_len=3)
    assert itself.tokens == plain.tokens
    assert itself.decode_steps <= -(-(NEW_TOKENS - 1) // 4) + 1  # 4 tokens a step when every draft is right
    unrelated = generate(model, PROMPTS, max_new_tokens=NEW_TOKENS, stop_tokens=[], draft="model", draft_model=other, draft_len=3)
    assert unrelated.tokens == plain.tokens
    assert unrelated.accepted_drafts < itself.accepted_drafts  # its drafts were mostly rejected, and rolled back
    with pytest.raises(ValueError, match="draft='model' needs draft_model"):
        generate(model, PROMPTS, max_new_tokens=2, draft="model")


def test_sampling_is_seeded_and_top_p_narrows_to_greedy(tmp_path) -> None:
    family_checkpoint("qwen2", tmp_path)
    model = DecoderLM.from_pretrained(tmp_path, dtype=torch.float64)
    a = generate(model, PROMPTS, max_new_tokens=8, temperature=1.0, seed=3, stop_tokens=[]).tokens
    b = generate(model, PROMPTS, max_new_tokens=8, temperature=1.0, seed=3, stop_tokens=[]).tokens
    c = generate(model, PROMPTS, max_new_tokens=8, temperature=1.0, seed=4, stop_tokens=[]).tokens
    assert a == b and a != c
    narrow = generate(model, PROMPTS, max_new_tokens=8, temperature=1.0, top_p=1e-9, seed=5, stop_tokens=[]).tokens
    assert narrow == generate(model, PROMPTS, max_new_tokens=8, stop_tokens=[]).tokens  # only the top token survives
    with pytest.raises(ValueError, match="speculative drafts are verified greedily"):
        generate(model, PROMPTS, max_new_tokens=2, temperature=0.5, draft="prompt_lookup")


@pytest.mark.parametrize("family", ["llama", "gpt_oss", "gemma3", "llama4"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_one_forward_of_a_padded_batch_matches_hf_logits(family: str, side: str, tmp_path) -> None:
    """fp32 on both sides, rows of different lengths padded on the left or the right: every real token's logits equal
    HF's on that row alone (HF's own batched left padding shifts Llama 4's chunk boundaries by the padding: its chunks
    follow column indices, ours positions, as NxDI's do)."""
    from tolerances import FP32_VS_HF

    hf = family_checkpoint(family, tmp_path).float()
    ours = DecoderLM.from_pretrained(tmp_path, dtype=torch.float32)
    width = max(len(p) for p in PROMPTS)
    ids = torch.zeros(len(PROMPTS), width, dtype=torch.long)
    mask = torch.zeros(len(PROMPTS), width, dtype=torch.bool)
    for b, p in enumerate(PROMPTS):
        cols = slice(width - len(p), width) if side == "left" else slice(0, len(p))
        ids[b, cols], mask[b, cols] = torch.tensor(p), True
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # each row's real tokens at 0, 1, ...; pads anywhere valid
    with torch.no_grad():
        expected = torch.zeros(len(PROMPTS), width, hf.config.vocab_size)
        for b, p in enumerate(PROMPTS):
            expected[b, mask[b]] = hf(torch.tensor([p])).logits[0]
        got = ours(ids, position_ids=positions, attention_mask=mask, cache=ours.new_cache(len(PROMPTS), width))
    scale = expected[mask].abs().max().item()
    assert (got[mask] - expected[mask]).abs().max().item() <= FP32_VS_HF * max(1.0, scale)


@pytest.mark.parametrize("family", ["gpt_oss", "llama4", "gemma3"])
def test_fp32_generation_and_serving_match_hf_generate(family: str, tmp_path) -> None:
    """fp32 on both sides (the precision people serve in), and `serve` over the paged cache (window / chunk layers
    release blocks their queries can no longer see): HF generate's tokens."""
    from distattn.models import serve

    hf = family_checkpoint(family, tmp_path).float()
    ours = DecoderLM.from_pretrained(tmp_path, dtype=torch.float32)
    n = new_tokens(family)
    expected = [hf.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, pad_token_id=0)[0, len(p):].tolist() for p in PROMPTS]
    assert generate_greedy(ours, PROMPTS, max_new_tokens=n) == expected
    assert serve(ours, PROMPTS, max_new_tokens=n, max_running=2, prefill_chunk=4, block_size=4).tokens == expected
