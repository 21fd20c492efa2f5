"""`distattn serve` as a real server process on a free local port, driven by the official `openai` client."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from distattn.models import DecoderLM, generate  # noqa: E402

from test_models import family_checkpoint  # noqa: E402

WORDS = ["<pad>", "<s>", "</s>", "<user>", "<assistant>"] + [f"w{i}" for i in range(5, 97)]  # the checkpoint's 97 ids
EOS = 96  # the served checkpoint's end token ("w96")
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def _tokenizer(path: Path) -> None:
    """A word-level tokenizer over the checkpoint's vocabulary: BOS first, a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<pad>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(root: Path, *options: str) -> tuple[subprocess.Popen, str]:
    """`distattn serve --model root *options` on a free port, once /health answers 200."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "distattn.cli", "serve", "--model", str(root), "--port", str(port), *options],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise AssertionError("the server did not come up: " + (proc.stdout.read() if proc.stdout else ""))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    family_checkpoint("llama", root)
    for name in ("config.json", "generation_config.json"):  # end on a token the random model rarely picks: long outputs
        cfg = json.loads((root / name).read_text())
        cfg["eos_token_id"] = EOS
        (root / name).write_text(json.dumps(cfg))
    _tokenizer(root)
    proc, url = _start(root, "--served-model-name", "tiny", "--max-running", "4", "--prefill-chunk", "8", "--block-size", "4",
                       "--max-model-len", "64", "--max-queue", "40")
    yield url, root
    proc.terminate()
    proc.wait(timeout=30)


def _expected(root: Path, ids: list[int], max_tokens: int) -> str:
    """What `generate` gives for these prompt ids, as text (the EOS token's text left out)."""
    from transformers import AutoTokenizer

    model = DecoderLM.from_pretrained(root, dtype=torch.float32)
    tokens = generate(model, [ids], max_new_tokens=max_tokens).tokens[0]
    return AutoTokenizer.from_pretrained(root).decode([t for t in tokens if t != EOS])


def test_completions_and_chat_equal_generate(server) -> None:
    url, root = server
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root)
    client = openai.OpenAI(base_url=url + "/v1", api_key="none")
    prompt = "w7 w9 w11 w13 w15 w17"
    expected = _expected(root, tok(prompt)["input_ids"], 12)
    done = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    assert done.choices[0].text == expected and done.choices[0].finish_reason in ("stop", "length")
    pieces = [c.choices[0].text for c in client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True)]
    assert "".join(pieces) == expected and len([p for p in pieces if p]) > 1  # token by token
    ids = [1, 30, 31, 32, 33]  # token-id prompts
    assert client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0).choices[0].text == _expected(root, ids, 8)

    messages = [{"role": "user", "content": "w20 w21 w22"}]
    chat_ids = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    expected = _expected(root, chat_ids, 10)
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert reply.choices[0].message.content == expected and reply.choices[0].message.role == "assistant"
    streamed = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_stop_strings_end_the_text_and_stream_the_same(server) -> None:
    url, root = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="none")
    full = client.completions.create(model="tiny", prompt="w7 w9 w11", max_tokens=12, temperature=0).choices[0].text
    words = full.split()
    stop = " ".join(words[3:5])  # a stop string spanning two tokens
    cut = client.completions.create(model="tiny", prompt="w7 w9 w11", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    pieces = client.completions.create(model="tiny", prompt="w7 w9 w11", max_tokens=12, temperature=0, stop=[stop], stream=True)
    assert "".join(c.choices[0].text for c in pieces) == cut.choices[0].text


def test_concurrent_streams_with_a_shared_prefix(server) -> None:
    """32 streaming clients at once (4 run, the rest wait): each gets its tokens alone; prefix hits show; no block leaks."""
    url, root = server
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none")
    shared = "w40 w41 w42 w43 w44 w45 w46 w47 w48 w49 w50 w51"
    prompts = [f"{shared} w{60 + i % 30}" for i in range(32)]

    async def one(prompt: str) -> str:
        text = ""
        async for c in await client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, stream=True):
            text += c.choices[0].text
        return text

    async def all_of_them() -> list[str]:
        return await asyncio.gather(*(one(p) for p in prompts))

    got = asyncio.run(all_of_them())
    sync = openai.OpenAI(base_url=url + "/v1", api_key="none")
    for prompt, text in zip(prompts[:6], got[:6]):  # alone, one at a time
        assert text == sync.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0).choices[0].text
    assert len(set(got)) > 1
    metrics = dict(line.split(" ", 1) for line in httpx.get(url + "/metrics").text.strip().splitlines())
    assert float(metrics["distattn:prefix_cache_hits_total"]) > 0
    assert float(metrics["distattn:kv_cache_blocks_used"]) == 0 and float(metrics["distattn:num_requests_running"]) == 0


BAD = [
    ("invalid JSON", "/v1/completions", "{not json", 400, "not valid JSON"),
    ("body not an object", "/v1/completions", "[1, 2]", 400, "must be a JSON object"),
    ("unknown model", "/v1/completions", {"model": "gpt-5", "prompt": "w7"}, 404, "The model `gpt-5` does not exist"),
    ("negative max_tokens", "/v1/completions", {"prompt": "w7", "max_tokens": -1}, 400, "max_tokens=-1 is invalid"),
    ("max_tokens a string", "/v1/completions", {"prompt": "w7", "max_tokens": "5"}, 400, "max_tokens='5' is invalid"),
    ("temperature < 0", "/v1/completions", {"prompt": "w7", "temperature": -0.5}, 400, "temperature=-0.5 is invalid"),
    ("top_p 0", "/v1/completions", {"prompt": "w7", "top_p": 0}, 400, "top_p=0 is invalid"),
    ("n = 2", "/v1/completions", {"prompt": "w7", "n": 2}, 400, "n=2 is invalid"),
    ("no prompt", "/v1/completions", {"max_tokens": 2}, 400, "prompt must be a string or a non-empty list"),
    ("token beyond vocab", "/v1/completions", {"prompt": [1, 500]}, 400, "prompt token ids [500] are outside the vocabulary"),
    ("prompt too long", "/v1/completions", {"prompt": " ".join(["w9"] * 70), "max_tokens": 4}, 400,
     "maximum context length is 64 tokens. However, you requested 75 tokens (71 in the prompt, 4 in the completion)"),
    ("completion too long", "/v1/completions", {"prompt": "w7", "max_tokens": 100}, 400, "maximum context length is 64"),
    ("five stop strings", "/v1/completions", {"prompt": "w7", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop="),
    ("logprobs", "/v1/completions", {"prompt": "w7", "logprobs": 2}, 400, "logprobs are not supported"),
    ("stream a string", "/v1/completions", {"prompt": "w7", "stream": "yes"}, 400, "stream='yes' is invalid"),
    ("chat without messages", "/v1/chat/completions", {"max_tokens": 2}, 400, "messages must be a non-empty list"),
    ("chat content a number", "/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages must be"),
    ("bad request with stream", "/v1/chat/completions", {"messages": [], "stream": True}, 400, "messages must be"),
    ("unknown route", "/v1/embeddings", {"input": "w7"}, 404, "Not Found"),
]


@pytest.mark.parametrize("name,path,body,status,message", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_errors(server, name: str, path: str, body: object, status: int, message: str) -> None:
    url, _ = server
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(url + path, content=content, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"] and set(error) == {"message", "type", "param", "code"}
    assert httpx.get(url + "/health").status_code == 200  # still serving


def test_a_client_that_disconnects_mid_stream_frees_its_blocks(server) -> None:
    url, _ = server
    with httpx.stream("POST", url + "/v1/completions", json={"prompt": "w7 w8 w9", "max_tokens": 40, "stream": True}, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break  # one token, then the client goes away
    deadline = time.time() + 20
    while time.time() < deadline:
        metrics = httpx.get(url + "/metrics").text
        if re.search(r"^distattn:kv_cache_blocks_used 0$", metrics, re.M) and re.search(r"^distattn:num_requests_running 0$", metrics, re.M):
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the disconnected request still holds blocks:\n" + metrics)
    assert openai.OpenAI(base_url=url + "/v1", api_key="none").completions.create(model="tiny", prompt="w7", max_tokens=2).choices


def test_a_full_queue_answers_429_and_the_rest_complete(server) -> None:
    url, _ = server

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(client.post(url + "/v1/completions", json={"prompt": f"w{10 + i % 50} w11", "max_tokens": 24})
                                          for i in range(60)))

    replies = asyncio.run(burst())
    codes = sorted({r.status_code for r in replies})
    assert codes == [200, 429], codes  # --max-queue 40: the rest are refused, not queued without bound
    refused = next(r for r in replies if r.status_code == 429).json()["error"]
    assert refused["code"] == "queue_full" and "--max-queue 40" in refused["message"]
    assert httpx.get(url + "/health").status_code == 200


def test_docs_examples_run_against_the_server(server, capsys) -> None:
    """The quickstart's curl and openai examples, as written, against this server (its URL swapped in)."""
    url, _ = server
    sys.path.insert(0, str(Path(__file__).parent))
    from test_docs import SERVER, blocks

    ran = 0
    for _, _, code in blocks("python"):
        if SERVER in code:
            exec(compile(code.replace(SERVER, url), "docs example", "exec"), {"__name__": "__docs__"})
            ran += 1
    for _, _, code in blocks("bash"):
        for line in code.splitlines():
            if SERVER in line:
                done = subprocess.run(line.replace(SERVER, url), shell=True, capture_output=True, text=True, timeout=60)
                assert done.returncode == 0 and json.loads(done.stdout)["choices"][0]["text"], done.stdout + done.stderr
                ran += 1
    assert ran >= 2 and capsys.readouterr().out.strip()


def test_tensor_parallel_server_gives_the_tokens_of_one_process(server) -> None:
    """`distattn serve --tp 2` (torchrun: rank 0 serves HTTP, both ranks step the engine): tp 1's tokens."""
    url, root = server
    proc, tp2 = _start(root, "--tp", "2", "--served-model-name", "tiny", "--max-model-len", "64", "--block-size", "4")
    try:
        for prompt in ("w7 w9 w11 w13", [1, 30, 31, 32], "w40 w41"):
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0}
            one, two = (httpx.post(u + "/v1/completions", json=body, timeout=120).json()["choices"][0] for u in (url, tp2))
            assert two["token_ids"] == one["token_ids"] and two["text"] == one["text"] and len(one["token_ids"]) > 0
        streamed = httpx.post(tp2 + "/v1/completions", json={**body, "stream": True}, timeout=120).text
        assert streamed.rstrip().endswith("data: [DONE]")
    finally:
        proc.terminate()  # SIGTERM to the command the user started: torchrun and both workers stop with it
        proc.wait(timeout=60)
    port = tp2.rsplit(":", 1)[1]
    deadline = time.time() + 10
    while time.time() < deadline and _processes_with(f"--port {port}"):
        time.sleep(0.2)
    assert not _processes_with(f"--port {port}"), "processes of the tp-2 server outlived SIGTERM"
    with socket.socket() as s:
        s.bind(("127.0.0.1", int(port)))  # the port is free again


def _processes_with(text: str) -> list[int]:
    """Live processes whose command line holds `text` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                line = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in line:
                found.append(int(entry.name))
    return found


def test_lora_adapters_and_speculation_are_served(server, tmp_path) -> None:
    """--lora NAME=DIR: clients name the adapter as the model (generate's tokens with that adapter); --draft
    prompt_lookup gives greedy's tokens."""
    url, root = server
    from test_bad_inputs import _save_adapter

    adapter = _save_adapter(tmp_path / "adapter")
    proc, other = _start(root, "--served-model-name", "tiny", "--max-model-len", "64", "--lora", f"sql={adapter}", "--draft", "prompt_lookup")
    try:
        assert [m["id"] for m in httpx.get(other + "/v1/models").json()["data"]] == ["tiny", "sql"]
        ids = [1, 7, 8, 9, 7, 8, 9, 7]  # repeats: drafts get proposed
        model = DecoderLM.from_pretrained(root, dtype=torch.float32)
        model.load_lora_adapters([adapter])
        for name, adapter_id in (("tiny", -1), ("sql", 0)):
            got = httpx.post(other + "/v1/completions", json={"model": name, "prompt": ids, "max_tokens": 10, "temperature": 0},
                             timeout=60).json()["choices"][0]["token_ids"]
            assert got == generate(model, [ids], max_new_tokens=10, adapter_ids=[adapter_id]).tokens[0]
        refused = httpx.post(other + "/v1/completions", json={"prompt": ids, "temperature": 0.7}, timeout=60)
        assert refused.status_code == 400 and "verified greedily" in refused.json()["error"]["message"]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
