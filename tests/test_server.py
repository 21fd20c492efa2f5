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

from processes import processes_with  # noqa: E402
from test_models import family_checkpoint  # noqa: E402

WORDS = ["<pad>", "<s>", "</s>", "<user>", "<assistant>"] + [f"w{i}" for i in range(5, 97)]  # the checkpoint's 97 ids
EOS = 96  # the served checkpoint's end token ("w96")
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('tool messages need a tool call first') }}"
                 "{% endif %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")


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
    ("n = 17", "/v1/completions", {"prompt": "w7", "n": 17}, 400, "n=17 is invalid: pass an integer in [1, 16]"),
    ("no prompt", "/v1/completions", {"max_tokens": 2}, 400, "prompt must be a string or a non-empty list"),
    ("token beyond vocab", "/v1/completions", {"prompt": [1, 500]}, 400, "prompt token ids [500] are outside the vocabulary"),
    ("prompt too long", "/v1/completions", {"prompt": " ".join(["w9"] * 70), "max_tokens": 4}, 400,
     "maximum context length is 64 tokens. However, you requested 75 tokens (71 in the prompt, 4 in the completion)"),
    ("completion too long", "/v1/completions", {"prompt": "w7", "max_tokens": 100}, 400, "maximum context length is 64"),
    ("five stop strings", "/v1/completions", {"prompt": "w7", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop="),
    ("logprobs 21", "/v1/completions", {"prompt": "w7", "logprobs": 21}, 400, "logprobs=21 is invalid: pass an integer in [0, 20]"),
    ("chat logprobs an int", "/v1/chat/completions", {"messages": [{"role": "user", "content": "w7"}], "logprobs": 2}, 400,
     "logprobs=2 is invalid: pass true or false"),
    ("top_logprobs without logprobs", "/v1/chat/completions", {"messages": [{"role": "user", "content": "w7"}], "top_logprobs": 2}, 400,
     "top_logprobs needs logprobs: true"),
    ("an unknown field", "/v1/completions", {"prompt": "w7", "temprature": 0.5}, 400, "Unrecognized request argument supplied: temprature"),
    ("tools", "/v1/chat/completions", {"messages": [{"role": "user", "content": "w7"}], "tools": [{"type": "function"}]}, 400,
     "tools is not supported"),
    ("response_format json", "/v1/chat/completions", {"messages": [{"role": "user", "content": "w7"}],
                                                      "response_format": {"type": "json_object"}}, 400, "response_format is not supported"),
    ("suffix", "/v1/completions", {"prompt": "w7", "suffix": "w9"}, 400, "suffix is not supported"),
    ("best_of above n", "/v1/completions", {"prompt": "w7", "best_of": 3}, 400, "best_of must equal n"),
    ("stream_options without stream", "/v1/completions", {"prompt": "w7", "stream_options": {"include_usage": True}}, 400,
     "stream_options is only allowed when stream is true"),
    ("stream_options unknown key", "/v1/completions", {"prompt": "w7", "stream": True, "stream_options": {"usage": True}}, 400,
     "stream_options={'usage': True} is invalid"),
    ("logit_bias not a token", "/v1/completions", {"prompt": "w7", "logit_bias": {"w7": 5}}, 400, "logit_bias: 'w7' is not a token id"),
    ("logit_bias beyond vocab", "/v1/completions", {"prompt": "w7", "logit_bias": {"97": 5}}, 400, "logit_bias: '97' is not a token id"),
    ("logit_bias 101", "/v1/completions", {"prompt": "w7", "logit_bias": {"9": 101}}, 400, "logit_bias['9']=101 is invalid"),
    ("logit_bias a list", "/v1/completions", {"prompt": "w7", "logit_bias": [[9, 5]]}, 400, "logit_bias=[[9, 5]] is invalid"),
    ("presence_penalty 3", "/v1/completions", {"prompt": "w7", "presence_penalty": 3}, 400, "presence_penalty=3 is invalid"),
    ("frequency_penalty nan", "/v1/completions", {"prompt": "w7", "frequency_penalty": "nan"}, 400, "frequency_penalty='nan' is invalid"),
    ("min_tokens above max_tokens", "/v1/completions", {"prompt": "w7", "max_tokens": 3, "min_tokens": 4}, 400, "min_tokens=4 is invalid"),
    ("ignore_eos a string", "/v1/completions", {"prompt": "w7", "ignore_eos": "yes"}, 400, "ignore_eos='yes' is invalid"),
    ("max_tokens and max_completion_tokens disagree", "/v1/completions", {"prompt": "w7", "max_tokens": 3, "max_completion_tokens": 4},
     400, "max_tokens=3 and max_completion_tokens=4 disagree"),
    ("echo a string", "/v1/completions", {"prompt": "w7", "echo": "yes"}, 400, "echo='yes' is invalid"),
    ("seed a float", "/v1/completions", {"prompt": "w7", "seed": 1.5}, 400, "seed=1.5 is invalid"),
    ("an image part", "/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "a part of type 'image_url'; this model reads text parts only"),
    ("an empty part list", "/v1/chat/completions", {"messages": [{"role": "user", "content": []}]}, 400, "messages must be"),
    ("a template's raise_exception", "/v1/chat/completions", {"messages": [{"role": "tool", "content": "w7"}]}, 400,
     "the model's chat template refused these messages: tool messages need a tool call first"),
    ("a body nested 100,000 deep", "/v1/completions", "[" * 100_000 + "]" * 100_000, 400, "nests too deeply"),
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


def _logits(root: Path, ids: list[int]) -> torch.Tensor:
    """The model's logits `[len(ids), vocab]` over a whole sequence, recomputed with no cache (the reference)."""
    model = DecoderLM.from_pretrained(root, dtype=torch.float32, pack=False)
    with torch.no_grad():
        return model(torch.tensor([ids]), position_ids=torch.arange(len(ids)).view(1, -1), cache=model.new_cache(1, len(ids)))[0]


def _reference(root: Path, ids: list[int], new: int, bias: dict[int, float] | None = None, presence: float = 0.0,
               frequency: float = 0.0) -> list[int]:
    """Greedy tokens with OpenAI's logit changes applied on a full recompute per token: logit[v] + bias[v]
    - frequency * count[v] - presence * (count[v] > 0), counting the completion's own tokens."""
    out: list[int] = []
    for _ in range(new):
        logits = _logits(root, ids + out)[-1].double()
        for token, value in (bias or {}).items():
            logits[token] += value
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[0]).double() if out else torch.zeros_like(logits)
        logits -= frequency * counts + presence * (counts > 0).double()
        out.append(int(logits.argmax()))
    return out


def test_logprobs_and_echo_equal_log_softmax_of_the_model(server) -> None:
    """Completions logprobs (and echo's prompt logprobs), chat logprobs with top_logprobs: log_softmax of the model's own
    logits recomputed without a cache, to 1e-5 (fp32: the cache and the fused kernels round differently); streaming and
    non-streaming give the same values; the top alternatives are the most likely tokens in order."""
    url, root = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="none")
    ids = [1, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39]  # 11 tokens: two prefill chunks of 8 in the server
    done = client.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0, logprobs=3, echo=True).choices[0]
    made = done.model_extra["token_ids"]
    logp = torch.log_softmax(_logits(root, ids + made).double(), -1)
    expected = [None] + [logp[i - 1, t].item() for i, t in enumerate(ids + made) if i > 0]
    got = done.logprobs.token_logprobs
    assert got[0] is None and len(got) == len(expected)
    assert max(abs(a - b) for a, b in zip(got[1:], expected[1:])) < 1e-5  # fp32 recompute vs the engine's cached steps
    top = done.logprobs.top_logprobs[-1]
    best = logp[len(ids) + len(made) - 2].topk(3)
    assert [float(v) for v in top.values()] == pytest.approx(best.values.tolist(), abs=1e-5)
    streamed = [c.choices[0].logprobs for c in client.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0,
                                                                          logprobs=3, echo=True, stream=True)]
    assert [v for lp in streamed if lp is not None for v in lp.token_logprobs] == got

    messages = [{"role": "user", "content": [{"type": "text", "text": "w20 w21"}, {"type": "text", "text": "w22"}]}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=4, temperature=0, logprobs=True,
                                          top_logprobs=2).choices[0]
    from transformers import AutoTokenizer

    joined = [{"role": "user", "content": "w20 w21\nw22"}]
    prompt = list(AutoTokenizer.from_pretrained(root).apply_chat_template(joined, add_generation_prompt=True, tokenize=True, return_dict=False))
    made = chat.model_extra["token_ids"]
    logp = torch.log_softmax(_logits(root, prompt + made).double(), -1)
    values = [entry.logprob for entry in chat.logprobs.content]
    assert max(abs(v - logp[len(prompt) - 1 + i, t].item()) for i, (v, t) in enumerate(zip(values, made))) < 1e-5
    assert all(len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob for entry in chat.logprobs.content)
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert [e.logprob for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content] == values
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(made)


def test_n_logit_bias_penalties_ignore_eos_and_min_tokens(server) -> None:
    """n=3 gives three choices (greedy: equal; sampled with a seed: choice i draws with seed + i, reproducibly); logit_bias
    -100 bans a token and +100 forces one; presence / frequency penalties give the tokens of OpenAI's formula on a recompute;
    ignore_eos and min_tokens keep a row past its end token."""
    url, root = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="none")
    ids = [1, 40, 41, 42]
    greedy = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0, n=3)
    assert len(greedy.choices) == 3 and [c.index for c in greedy.choices] == [0, 1, 2]
    assert len({c.text for c in greedy.choices}) == 1 and greedy.usage.completion_tokens == 3 * len(greedy.choices[0].model_extra["token_ids"])
    sampled = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=1.0, n=3, seed=11)
    again = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=1.0, n=3, seed=11)
    assert [c.text for c in sampled.choices] == [c.text for c in again.choices] and len({c.text for c in sampled.choices}) > 1
    one = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=1.0, seed=12).choices[0].text
    assert one == sampled.choices[1].text  # choice 1 drew with seed 11 + 1

    first = greedy.choices[0].model_extra["token_ids"]
    banned = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0, logit_bias={str(first[0]): -100})
    got = banned.choices[0].model_extra["token_ids"]
    assert first[0] not in got and got == _reference(root, ids, len(got), bias={first[0]: -100.0})
    forced = client.completions.create(model="tiny", prompt=ids, max_tokens=4, temperature=0, logit_bias={"50": 100})
    assert forced.choices[0].model_extra["token_ids"] == [50] * 4
    for presence, frequency in ((1.5, 0.0), (0.0, 2.0), (-1.0, 0.5)):
        body = {"prompt": ids, "max_tokens": 10, "temperature": 0, "presence_penalty": presence, "frequency_penalty": frequency}
        got = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["token_ids"]
        assert got == _reference(root, ids, len(got), presence=presence, frequency=frequency), (presence, frequency)
    ends = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0, logit_bias={str(EOS): 100})
    assert ends.choices[0].model_extra["token_ids"] == [EOS] and ends.choices[0].finish_reason == "stop"
    kept = httpx.post(url + "/v1/completions", json={"prompt": ids, "max_tokens": 8, "temperature": 0, "logit_bias": {str(EOS): 100},
                                                     "ignore_eos": True}, timeout=60).json()["choices"][0]
    assert kept["token_ids"] == [EOS] * 8 and kept["finish_reason"] == "length"
    late = httpx.post(url + "/v1/completions", json={"prompt": ids, "max_tokens": 8, "temperature": 0, "logit_bias": {str(EOS): 100},
                                                     "min_tokens": 3}, timeout=60).json()["choices"][0]
    assert late["token_ids"][3] == EOS and EOS not in late["token_ids"][:3] and len(late["token_ids"]) == 4


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
    while time.time() < deadline and processes_with(f"--port {port}"):
        time.sleep(0.2)
    assert not processes_with(f"--port {port}"), "processes of the tp-2 server outlived SIGTERM"
    with socket.socket() as s:
        s.bind(("127.0.0.1", int(port)))  # the port is free again


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
