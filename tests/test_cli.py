"""The command line: generate on one process, and errors a person can act on."""

from __future__ import annotations

import json

import pytest
import torch

from distattn.cli import demo_checkpoint, main
from distattn.models import DecoderLM, generate


def test_generate_prints_json(tmp_path, capsys) -> None:
    checkpoint = demo_checkpoint(tmp_path)
    assert main(["generate", "--model", str(checkpoint), "--prompt-ids", "1,2,3", "4,5", "--max-new-tokens", "5", "--json",
                 "--dtype", "float64"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = generate(DecoderLM.from_pretrained(checkpoint, dtype=torch.float64), [[1, 2, 3], [4, 5]], max_new_tokens=5).tokens
    assert report["tokens"] == expected and report["tp"] == 1


def test_generate_with_quantized_weights_and_cache_equals_the_python_api(tmp_path, capsys) -> None:
    checkpoint = demo_checkpoint(tmp_path)
    assert main(["generate", "--model", str(checkpoint), "--prompt-ids", "1,2,3", "4,5", "--max-new-tokens", "6", "--json",
                 "--quantize", "int8", "--kv-cache-dtype", "fp8"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model = DecoderLM.from_pretrained(checkpoint, quantize="int8", kv_cache_dtype="fp8")
    assert report["tokens"] == generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=6).tokens


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "/nonexistent"], "no config.json there"),
        (["--prompt-ids", "1,x"], "--prompt-ids takes comma-separated integers"),
        (["--tp", "2", "--cp", "3", "--prompt-ids", "1"], "must divide --tp"),
        ([], "pass --prompt TEXT"),
        (["--prompt", "hello"], "needs a tokenizer"),
        (["--prompt-ids", "1", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--prompt-ids", "1", "--adapter-ids", "0"], "--adapter-ids picks among --lora adapters"),
        (["--prompt-ids", "1", "--lora", "/a", "--adapter-ids", "1"], "each must be -1 (no adapter) or below the 1 --lora adapters"),
        (["--prompt-ids", "1", "1", "--paged", "--tp", "2", "--dp", "2"], "--paged does not support data-parallel decode"),
        (["--prompt-ids", "1", "--paged", "--block-size", "0"], "--block-size must be >= 1"),
        (["--prompt-ids", "1", "--draft", "model"], "--draft model and --draft-model DIR go together"),
        (["--prompt-ids", "1", "--compile", "--tp", "2"], "--compile runs at --tp 1"),
        (["--prompt-ids", "1", "--kv-cache-dtype", "fp4"], "argument --kv-cache-dtype: invalid choice: 'fp4'"),
    ],
)
def test_generate_errors(tmp_path, capsys, args, message) -> None:
    checkpoint = demo_checkpoint(tmp_path)
    base = ["generate", "--model", str(checkpoint)]
    if args and args[0] == "--model":
        base = ["generate"]
    with pytest.raises(SystemExit) as stop:
        main(base + args)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_generate_uses_the_checkpoint_tokenizer(tmp_path, capsys) -> None:
    """A checkpoint with a tokenizer takes --prompt text (a word-level tokenizer made here)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    checkpoint = demo_checkpoint(tmp_path)
    vocab = {w: i for i, w in enumerate(["<unk>", "the", "cat", "sat", "on", "mat"])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>").save_pretrained(checkpoint)
    assert main(["generate", "--model", str(checkpoint), "--prompt", "the cat sat", "--max-new-tokens", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = generate(DecoderLM.from_pretrained(checkpoint), [[1, 2, 3]], max_new_tokens=3).tokens
    assert report["tokens"] == expected
    from transformers import AutoTokenizer

    assert report["text"] == [AutoTokenizer.from_pretrained(checkpoint).decode(expected[0])]  # text prompts are answered as text


def test_generate_paged_with_lora_equals_the_python_api(tmp_path, capsys) -> None:
    """--paged serves over the paged cache and --lora loads PEFT adapters: the same tokens as generate()."""
    peft = pytest.importorskip("peft")
    import transformers

    checkpoint = demo_checkpoint(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
    torch.manual_seed(3)
    adapter = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter.save_pretrained(tmp_path / "lora")
    prompts = ["5,17,3,44,9,1,30,2", "5,17,3,44,9,1,30,7", "7,7,21"]
    assert main(["generate", "--model", str(checkpoint), "--prompt-ids", *prompts, "--max-new-tokens", "6", "--json", "--dtype", "float64",
                 "--paged", "--block-size", "4", "--max-running", "1", "--lora", str(tmp_path / "lora"), "--adapter-ids", "0", "0", "-1"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model = DecoderLM.from_pretrained(checkpoint, dtype=torch.float64)
    model.load_lora_adapters([tmp_path / "lora"])
    ids = [[int(t) for t in p.split(",")] for p in prompts]
    assert report["tokens"] == generate(model, ids, max_new_tokens=6, adapter_ids=[0, 0, -1]).tokens
    assert report["cached_prompt_tokens"] == 4  # one at a time: the second prompt reuses the first one's block (same adapter)


def test_generate_with_a_draft_model(tmp_path, capsys) -> None:
    """--draft model --draft-model DIR: speculative decoding with a draft checkpoint, greedy's tokens."""
    checkpoint = demo_checkpoint(tmp_path)
    assert main(["generate", "--model", str(checkpoint), "--prompt-ids", "5,17,3", "7,7", "--max-new-tokens", "6", "--json", "--dtype", "float64",
                 "--draft", "model", "--draft-model", str(checkpoint)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = generate(DecoderLM.from_pretrained(checkpoint, dtype=torch.float64), [[5, 17, 3], [7, 7]], max_new_tokens=6).tokens
    assert report["tokens"] == expected and report["accepted_drafts"] > 0  # the model drafting for itself is always right


def synopsis_lines() -> list[str]:
    """The `distattn ...` lines of the README's command-line synopsis."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("## Command line", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.startswith("distattn")]


@pytest.mark.parametrize("line", synopsis_lines())
def test_readme_synopsis_lines_parse(line: str) -> None:
    """Every line of the README's synopsis is a valid command: placeholders filled, optional parts included."""
    import re
    import shlex

    from distattn.cli import build_parser

    line = line.replace("...", "--model M --prompt-ids 1", 1).replace("[DIR ...]", "")
    line = re.sub(r"\b(SMALL_DIR|ADAPTER_DIR|DIR)\b", "D", line).replace("[", "").replace("]", "")
    args = shlex.split(line)[1:]
    if args[0] == "bench":  # bench hands its options to the benchmark's own parser
        if "--model" in args:
            from distattn.frontends.model_bench import parse_args as parse_model_args

            parse_model_args([a for a in args[1:] if a != "--model"])
            return
        from distattn.frontends.bench import parse_args

        parse_args(args[1:])
        return
    build_parser().parse_args(args)  # SystemExit(2) on an unknown or malformed option
