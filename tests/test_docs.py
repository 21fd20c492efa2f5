"""The documentation site builds strictly, every example in it and in the README runs,
and the NxDI migration table covers every NxDI name in scope."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", flags=re.S | re.M)
TORCHRUN = re.compile(r"# torchrun --nproc-per-node (\d+)\n")

# Shell commands the docs show that other tests already run, with the proof: a string
# that test file must contain. Everything else in a bash block is run here.
COVERED = {
    'pip install -c constraints.txt -e ".[hf]" && distattn demo': ("tests/test_readme.py", '"demo"'),
    'pip install -c constraints.txt -e ".[test]" && python -m pytest': (".ci/run", 'pip install -c constraints.txt -e ".[test]" && python -m pytest'),
    "python examples/quickstart.py": ("tests/test_readme.py", '"quickstart.py"'),
    "torchrun --standalone --nproc-per-node 2 examples/tensor_parallel.py": ("tests/distributed/test_torchrun.py", '"tensor_parallel.py", 2'),
}


def blocks(kind: str) -> list[tuple[str, int, str]]:
    """(page, index, code) of every fenced block of `kind` in the docs and the README."""
    found = []
    for page in PAGES:
        for i, (lang, code) in enumerate(FENCE.findall(page.read_text())):
            if lang == kind:
                found.append((str(page.relative_to(ROOT)), i, code))
    return found


def _env() -> dict[str, str]:
    return {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "examples"), os.environ.get("PYTHONPATH", "")])}


def test_every_fence_says_what_it_holds() -> None:
    """python and bash blocks run; text blocks are output or layout. An unlabeled fence could hide an example."""
    for page in PAGES:
        for lang, _ in FENCE.findall(page.read_text()):
            assert lang in ("python", "bash", "text"), f"{page.relative_to(ROOT)}: a ```{lang} block; label it python, bash or text"


def test_mkdocs_build_strict(tmp_path) -> None:
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=_env())
    assert done.returncode == 0, done.stdout + done.stderr  # strict: broken links and missing references fail
    assert (tmp_path / "site" / "reference" / "attention" / "index.html").exists()


SERVER = "http://localhost:8000"  # examples that talk to `distattn serve`: tests/test_server.py runs them against a live server


@pytest.mark.parametrize("page,index,code", blocks("python"), ids=lambda v: str(v)[:40] if isinstance(v, str) else str(v))
def test_python_example_runs(page: str, index: int, code: str, tmp_path) -> None:
    if SERVER in code:
        assert "def test_docs_examples_run_against_the_server" in (ROOT / "tests" / "test_server.py").read_text()
        return
    launch = TORCHRUN.match(code)
    if launch:  # a multi-process example: run it as written under torchrun
        script = tmp_path / "example.py"
        script.write_text(code)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", launch.group(1), str(script)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT, env=_env())
        assert done.returncode == 0, f"{page} block {index}:\n{done.stdout}{done.stderr}"
    else:
        exec(compile(code, f"{page} block {index}", "exec"), {"__name__": "__docs__"})


def bash_commands() -> list[tuple[str, str]]:
    return [(page, line.strip()) for page, _, code in blocks("bash") for line in code.splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("page,command", bash_commands())
def test_bash_command_runs_or_is_run_elsewhere(page: str, command: str) -> None:
    if SERVER in command:
        assert "def test_docs_examples_run_against_the_server" in (ROOT / "tests" / "test_server.py").read_text()
        return
    if command in COVERED:
        where, proof = COVERED[command]
        assert proof in (ROOT / where).read_text(), f"{where} no longer runs `{command}`"
        return
    done = subprocess.run(command.replace("torchrun ", f"{sys.executable} -m torch.distributed.run ", 1), shell=True,
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=_env())
    assert done.returncode == 0, f"{page}: `{command}`\n{done.stdout}{done.stderr}"


def test_chart_on_the_site_is_the_benchmark_chart() -> None:
    assert (ROOT / "docs" / "assets" / "attention_bench.png").read_bytes() == (ROOT / "benchmarks" / "results" / "attention_bench.png").read_bytes()


# ---- the migration table ---------------------------------------------------------------------

SEED = ROOT.parent / "shared" / "seed" / "000_b8ec81b386f70f9b.txt"
# snake_case words of the seed that name its own files and documents, not NxDI code
SEED_NOT_NXDI = {"attention_base", "neuron_attention_analysis", "neuron_attention_code_references"}
SEED_NAMES = {  # its snake_case words, recorded so CI checks them where the seed is absent
    "active_mask", "adapter_ids", "attention_mask", "attention_process_groups", "attn_out", "bias_qkv",
    "chunked_attention", "compute_for_token_gen", "cos_cache", "cp_degree", "fused_qkv", "get_kv_per_layer",
    "get_learned_sinks", "head_dim", "hidden_size", "hidden_states", "init_gqa_properties", "init_tkg_cp_qkv_o_proj",
    "k_proj", "kv_mgr", "learned_sinks", "learned_sinks_size", "num_attention_heads", "num_heads",
    "num_key_value_heads", "num_kv_heads", "o_bias", "output_dim", "past_key_value", "position_ids",
    "present_key_value", "q_proj", "qkv_bias", "requires_grad", "rotary_position_ids", "seq_len", "sin_cache",
    "sliding_window", "standard_causal_attention", "standard_causal_attention_forward", "tensor_model_parallel_size",
    "tkg_learned_sinks", "update_kv_per_layer", "v_proj",
}
# forward parameters the seed lists that are single words
SEED_FORWARD = {"hidden_states", "attention_mask", "position_ids", "past_key_value", "active_mask", "adapter_ids", "cos_cache",
                "sin_cache", "rmsnorm", "rotary_position_ids", "kv_mgr", "get_kv_per_layer", "update_kv_per_layer", "residual"}
# NxDI arguments and neuron_config fields within DESIGN.md's scope (projections, QK-norm, clip, RoPE,
# sinks, routes, stages, speculation, TP / CP / DP, caches, kernels)
DESIGN_SCOPE = {
    "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "rotary_emb", "rms_norm_eps", "use_qk_norm",
    "q_layernorm", "k_layernorm", "qk_norm_placement", "post_transpose_layernorm", "clip_qkv", "qkv_bias", "o_bias", "fused_qkv",
    "learned_sinks_size", "sliding_window", "attention_chunk_size", "softmax_scale", "tensor_model_parallel_group",
    "sequence_parallel_enabled", "num_cores_per_group", "rpl_reduce_dtype", "torch_dtype", "tp_degree", "cp_degree",
    "attention_dp_degree", "max_batch_size", "seq_len", "max_context_length", "padding_side", "is_continuous_batching",
    "speculation_length", "enable_fused_speculation", "flash_decoding_enabled", "attn_kernel_enabled", "qkv_kernel_enabled",
    "attn_tkg_nki_kernel_enabled", "attn_block_tkg_nki_kernel_enabled", "is_prefix_caching", "is_chunked_prefill",
    "is_block_kv_layout", "pa_num_blocks", "pa_block_size", "lora_config", "kv_cache_quant", "k_cache_transposed",
    "REPLICATE_TO_TP_DEGREE", "CONVERT_TO_MHA", "learned_sinks", "tkg_learned_sinks",
}


def migration_rows() -> str:
    """The first cells of the migration page's tables (where NxDI names live)."""
    page = (ROOT / "docs" / "migrating-from-nxdi.md").read_text()
    return "\n".join(line.split("|")[1] for line in page.splitlines() if line.startswith("| ") and line.count("|") >= 3)


def test_migration_table_covers_the_seed() -> None:
    if SEED.exists():  # beside the project in the workspace; a bare clone has only the recorded names
        assert set(re.findall(r"\b[a-z][a-z0-9]*(?:_[a-z0-9]+)+\b", SEED.read_text())) - SEED_NOT_NXDI == SEED_NAMES
    names = SEED_NAMES | SEED_FORWARD
    rows = migration_rows()
    missing = sorted(n for n in names if f"`{n}`" not in rows)
    assert not missing, f"the NxDI migration tables lack rows for {missing}"


def test_migration_table_covers_nxdi_in_design_scope() -> None:
    rows = migration_rows()
    missing = sorted(n for n in DESIGN_SCOPE if f"`{n}`" not in rows and f"`GQAStrategy.{n}`" not in rows)
    assert not missing, f"the NxDI migration tables lack rows for {missing}"


TESTED_REF = re.compile(r"`((?:distributed/)?test_\w+\.py)::(test_\w+)`")


def test_every_migration_row_says_where_it_is_tested() -> None:
    """Each row's last cell names tests (NxDI form, our form) that exist, or says not applicable."""
    page = (ROOT / "docs" / "migrating-from-nxdi.md").read_text()
    rows = [line for line in page.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    headers = {i for i, line in enumerate(rows) if "tested in" in line}
    assert len(headers) >= 8, "every table of the migration page has a 'tested in' column"
    checked = 0
    for i, line in enumerate(rows):
        if i in headers:
            continue
        cell = line.rstrip(" |").split("|")[-1].strip()
        refs = TESTED_REF.findall(cell)
        assert refs or cell.startswith("not applicable"), f"row without a test: {line[:80]}"
        assert not refs or cell.startswith(("NxDI:", "ours:")), f"say which form is tested: {line[:80]}"
        for path, name in refs:
            source = (ROOT / "tests" / path).read_text()
            assert f"def {name}(" in source, f"{path}::{name} (cited by the migration page) does not exist"
            checked += 1
    assert checked > 60
