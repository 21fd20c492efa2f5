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


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "/nonexistent"], "no config.json there"),
        (["--prompt-ids", "1,x"], "--prompt-ids takes comma-separated integers"),
        (["--tp", "2", "--cp", "3", "--prompt-ids", "1"], "must divide --tp"),
        ([], "pass --prompt TEXT"),
        (["--prompt", "hello"], "needs a tokenizer"),
        (["--prompt-ids", "1", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
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
