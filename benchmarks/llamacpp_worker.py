"""The llama.cpp side of benchmarks/llamacpp_compare.py, run by a Python that has llama-cpp-python.

One JSON argument; prints one JSON line. {"model", "quantize_to"}: write a Q8_0 copy. Otherwise
load `model` (2 threads) and either time a prefill of `prompt` and `new` one-token decode steps
(median of `repeats`), or with "logits": save the logits predicting each `path` token after
`prompt` (teacher-forced) to `logits_out` and return the model's own greedy continuation.
"""

import ctypes
import json
import sys
import time

import llama_cpp
import numpy as np

args = json.loads(sys.argv[1])
if args.get("quantize_to"):
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    p.nthread = 2
    rc = llama_cpp.llama_model_quantize(args["model"].encode(), args["quantize_to"].encode(), ctypes.byref(p))
    assert rc == 0, rc
    print(json.dumps({"ok": True})); sys.exit()
llm = llama_cpp.Llama(args["model"], n_threads=2, n_threads_batch=2, n_ctx=args["n_ctx"], n_batch=args["n_batch"], logits_all=args["logits"], verbose=False)
prompt, path = args["prompt"], args["path"]
out = {}
if args["logits"]:  # teacher-forced along path: the logits predicting each path token
    llm.reset(); llm.eval(prompt + path[:-1])
    scores = np.array(llm.scores[len(prompt) - 1 : len(prompt) - 1 + len(path)], dtype=np.float64)
    np.save(args["logits_out"], scores)
    # the model's own greedy continuation
    llm.reset(); llm.eval(prompt); own = []
    for _ in range(len(path)):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1])); own.append(tok); llm.eval([tok])
    out["own"] = own
else:
    pre, dec = [], []
    for _ in range(args["repeats"]):
        llm.reset(); t = time.perf_counter(); llm.eval(prompt); pre.append(time.perf_counter() - t)
        tok = 5; times = []
        for _ in range(args["new"]):
            t = time.perf_counter(); llm.eval([tok]); times.append(time.perf_counter() - t)
        dec.append(sorted(times)[len(times) // 2])
    out["prefill_ms"] = 1e3 * sorted(pre)[len(pre) // 2]; out["decode_ms"] = 1e3 * sorted(dec)[len(dec) // 2]
print(json.dumps(out))
