"""Greedy generation with tensor parallelism, CP prefill and DP decode equals HF generate."""

from __future__ import annotations

import functools

import pytest
import torch

from distributed.harness import run_workers
from test_models import NEW_TOKENS, family_checkpoint, new_tokens

PROMPTS = [[5, 17, 3, 44, 9, 1, 30, 2, 8, 61, 12], [7, 7, 21, 90], [33, 2, 5, 80, 14, 6, 3], [4, 50, 9]]  # 4 rows: dp 2 splits them


def _generate(
    rank: int, world_size: int, checkpoint: str, expected: list[list[int]], degrees: tuple[int, int],
    adapters: list[str] | None = None, adapter_ids: list[int] | None = None, new: int = NEW_TOKENS, options: dict | None = None,
) -> None:
    from distattn.models import DecoderLM, generate
    from distattn.parallel import ParallelGroups

    cp, dp = degrees
    groups = ParallelGroups.from_world(cp_degree=cp, dp_degree=dp)
    model = DecoderLM.from_pretrained(checkpoint, groups=groups, dtype=torch.float64, **(options or {}))
    if adapters:
        model.load_lora_adapters(adapters)
    got = generate(model, PROMPTS, max_new_tokens=new, adapter_ids=adapter_ids).tokens
    if got != expected:
        raise AssertionError(f"tp={groups.tp_size} cp={cp} dp={dp}: {got} != {expected}")


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "gpt_oss", "gemma3", "llama4"])
def test_parallel_generation_matches_hf(family: str, tmp_path) -> None:
    hf = family_checkpoint(family, tmp_path / "ckpt")
    expected = []
    for prompt in PROMPTS:
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=new_tokens(family), do_sample=False, pad_token_id=0)
        expected.append(out[0, len(prompt):].tolist())
    for degrees in [(1, 1), (2, 2)]:  # tp 2; then cp 2 prefill and dp 2 decode over the same 2 ranks
        run_workers(functools.partial(_generate, checkpoint=str(tmp_path / "ckpt"), expected=expected, degrees=degrees,
                                      new=new_tokens(family)), 2, tmp_path)


def test_parallel_generation_with_lora_matches_peft(tmp_path) -> None:
    """PEFT adapters, sharded over tp 2 (then cp 2 prefill + dp 2 decode): each row's tokens equal peft's generate."""
    peft = pytest.importorskip("peft")
    from test_lora import save_peft_adapters

    hf = family_checkpoint("llama", tmp_path / "ckpt")
    paths = save_peft_adapters(hf, tmp_path)
    reference = peft.PeftModel.from_pretrained(hf, paths[0], adapter_name="a0")
    reference.load_adapter(paths[1], adapter_name="a1")
    reference = reference.double().eval()
    adapter_ids = [0, 1, -1, 1]
    expected = []
    for prompt, adapter_id in zip(PROMPTS, adapter_ids):
        name = "__base__" if adapter_id < 0 else f"a{adapter_id}"
        out = reference.generate(input_ids=torch.tensor([prompt]), adapter_names=[name], max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        expected.append(out[0, len(prompt):].tolist())
    for degrees in [(1, 1), (2, 2)]:
        worker = functools.partial(
            _generate, checkpoint=str(tmp_path / "ckpt"), expected=expected, degrees=degrees,
            adapters=[str(p) for p in paths], adapter_ids=adapter_ids,
        )
        run_workers(worker, 2, tmp_path)


def test_mxfp4_experts_shard_like_dense_ones(tmp_path) -> None:
    """A gpt-oss checkpoint with MXFP4 experts at tp 2 (each rank dequantizes only its share), then cp 2 + dp 2:
    HF generate's tokens on the dequantized twin."""
    import transformers

    from test_models import new_tokens
    from test_mxfp4 import mxfp4_checkpoints

    packed, dense = mxfp4_checkpoints(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float64, experts_implementation="eager").eval()
    n = new_tokens("gpt_oss")
    expected = [hf.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, pad_token_id=0)[0, len(p):].tolist() for p in PROMPTS]
    for degrees in [(1, 1), (2, 2)]:
        run_workers(functools.partial(_generate, checkpoint=str(packed), expected=expected, degrees=degrees, new=n), 2, tmp_path)


@pytest.mark.parametrize("family,options", [("gpt_oss", {"kv_cache_dtype": "fp8"}), ("llama4", {"kv_cache_dtype": "int8"}),
                                            ("gpt_oss", {"quantize": "int8", "kv_cache_dtype": "int8"})])
def test_quantized_models_shard_like_one_process(family: str, options: dict, tmp_path) -> None:
    """tp 2, then cp 2 prefill + dp 2 decode, over a quantized cache (a rolling / chunked one for these families),
    and with int8 weights (experts too): one process's tokens. Cache scales are per token and kv head, so the heads
    a rank holds get the codes one process stores; weight scales are whole rows'."""
    from distattn.models import DecoderLM, generate

    family_checkpoint(family, tmp_path / "ckpt")
    one = DecoderLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float64, **options)
    expected = generate(one, PROMPTS, max_new_tokens=new_tokens(family)).tokens
    for degrees in [(1, 1), (2, 2)]:
        run_workers(functools.partial(_generate, checkpoint=str(tmp_path / "ckpt"), expected=expected, degrees=degrees,
                                      new=new_tokens(family), options=options), 2, tmp_path)


def _quantized_logits(rank: int, world_size: int, checkpoint: str, expected: torch.Tensor, kind: str = "int8") -> None:
    from distattn.models import DecoderLM
    from distattn.parallel import ParallelGroups

    from tolerances import INT8_KERNEL_BF16

    model = DecoderLM.from_pretrained(checkpoint, groups=ParallelGroups.from_world(), dtype=torch.float32, quantize=kind)
    cache = model.new_cache(1, 32)
    prompt = torch.tensor([PROMPTS[0]])
    got = [model(prompt, position_ids=torch.arange(prompt.shape[1]).view(1, -1), cache=cache)[:, -1]]
    for step, token in enumerate([5, 9, 13]):  # decode steps: the int8 kernel on each rank's shard
        got.append(model(torch.tensor([[token]]), position_ids=torch.tensor([[prompt.shape[1] + step]]), cache=cache)[:, -1])
    got = torch.cat(got)
    spread = (expected.amax(-1) - expected.amin(-1)).unsqueeze(-1)
    # each rank's partial product is rounded to bf16 before the all-reduce: a few bf16 roundings apart
    if not ((got - expected).abs() / spread).max() <= 8 * INT8_KERNEL_BF16:
        raise AssertionError(f"tp={world_size} {kind} logits differ from one process by {((got - expected).abs() / spread).max():.3g}")


@pytest.mark.parametrize("family,kind", [("llama", "int8"), ("llama", "int4"), ("llama", "nxdi-int8"), ("gpt_oss", "int8")])
def test_quantized_weights_shard_like_one_process(family: str, kind: str, tmp_path) -> None:
    """int8 / int4 at tp 2: an int8 row's scale is the whole row's (max over the ranks); an int4 group of 32 inputs
    lies within one rank's columns. So the codes are one process's and the logits stay those of one process.
    nxdi-int8: each rank reads its rows (and scales) of NxDI's int8 checkpoint; one process quantizes the float one.
    gpt-oss: int8 experts too (down's scales over the whole row)."""
    from distattn.models import DecoderLM

    from test_quantize import nxdi_int8_checkpoint

    family_checkpoint(family, tmp_path / "ckpt", **({"intermediate_size": 128} if family == "llama" else {}))  # llama down_proj: 2 int4 groups per rank
    checkpoint = tmp_path / "ckpt"
    if kind == "nxdi-int8":
        nxdi_int8_checkpoint(checkpoint, tmp_path / "nxdi")
        checkpoint, kind = tmp_path / "nxdi", "int8"
    model = DecoderLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32, quantize=kind)
    cache = model.new_cache(1, 32)
    prompt = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        expected = [model(prompt, position_ids=torch.arange(prompt.shape[1]).view(1, -1), cache=cache)[:, -1]]
        for step, token in enumerate([5, 9, 13]):
            expected.append(model(torch.tensor([[token]]), position_ids=torch.tensor([[prompt.shape[1] + step]]), cache=cache)[:, -1])
    run_workers(functools.partial(_quantized_logits, checkpoint=str(checkpoint), expected=torch.cat(expected), kind=kind), 2, tmp_path)
