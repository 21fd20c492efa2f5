"""Writes tests/data/nxdi_signatures.json: the signatures of every class and function `distattn.nxdi` mirrors,
as NxDI's source declares them (parameter names, kinds, defaults as source text; enum members; dataclass fields).

    python tools/nxdi_signatures.py PATH_TO_NXDI_CHECKOUT [COMMIT]

tests/test_nxdi_signatures.py checks ours against the file: run this again when NxDI changes.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

# our module -> NxDI's file (under src/neuronx_distributed_inference/) for the names distattn.nxdi.SUPPORTED lists
FILES = {
    "distattn.nxdi.models.config": "models/config.py",
    "distattn.nxdi.models.llama.modeling_llama": "models/llama/modeling_llama.py",
    "distattn.nxdi.utils.hf_adapter": "utils/hf_adapter.py",
    "distattn.nxdi.modules.attention.attention_base": "modules/attention/attention_base.py",
    "distattn.nxdi.modules.attention.utils": "modules/attention/utils.py",
    "distattn.nxdi.modules.custom_calls": "modules/custom_calls.py",
}
ALIASES = {"rotate_half": "_rotate_half"}  # NxDI's private name for the same function
METHODS = {  # the methods model code calls on these classes
    "NeuronAttentionBase": ("forward",),
    "RotaryEmbedding": ("forward", "get_inv_freqs"),
    "Llama3RotaryEmbedding": ("forward",),
    "CustomRMSNorm": ("forward",),
    "InferenceConfig": ("load_config", "add_derived_config", "get_required_attributes", "validate_config", "get_text_config",
                        "to_json_string", "save", "load", "get_neuron_config_cls"),
}


def _params(args: ast.arguments, skip_self: bool) -> list[dict]:
    positional = [*args.posonlyargs, *args.args]
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    out = [{"name": a.arg, "kind": "positional", "default": None if d is None else ast.unparse(d)} for a, d in zip(positional, defaults)]
    if skip_self and out and out[0]["name"] in ("self", "cls"):
        out = out[1:]
    if args.vararg:
        out.append({"name": args.vararg.arg, "kind": "var_positional", "default": None})
    out += [{"name": a.arg, "kind": "keyword_only", "default": None if d is None else ast.unparse(d)} for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    if args.kwarg:
        out.append({"name": args.kwarg.arg, "kind": "var_keyword", "default": None})
    return out


def describe(tree: ast.Module, name: str) -> dict | None:
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return {"kind": "function", "params": _params(node.args, False)}
        if isinstance(node, ast.ClassDef) and node.name == name:
            bases = [ast.unparse(b) for b in node.bases]
            if any(b.endswith("Enum") for b in bases):
                members = [t.id for s in node.body if isinstance(s, ast.Assign) for t in s.targets if isinstance(t, ast.Name)]
                return {"kind": "enum", "members": members}
            init = next((s for s in node.body if isinstance(s, ast.FunctionDef) and s.name == "__init__"), None)
            methods = {s.name: _params(s.args, True) for s in node.body if isinstance(s, ast.FunctionDef) and s.name in METHODS.get(name, ())}
            if init is not None:
                return {"kind": "class", "params": _params(init.args, True), "methods": methods}
            fields = [s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]
            return {"kind": "fields", "fields": fields}
    return None


def main() -> None:
    root = Path(sys.argv[1])
    commit = sys.argv[2] if len(sys.argv) > 2 else "HEAD"
    sys.path.insert(0, str(Path(__file__).parents[1] / "src"))
    from distattn.nxdi import SUPPORTED

    table: dict = {"nxdi_commit": subprocess.run(["git", "-C", str(root), "rev-parse", commit], capture_output=True, text=True).stdout.strip()}
    for module, names in SUPPORTED.items():
        path = "src/neuronx_distributed_inference/" + FILES[module]
        source = subprocess.run(["git", "-C", str(root), "show", f"{commit}:{path}"], capture_output=True, text=True, check=True).stdout
        tree = ast.parse(source)
        for name in names:
            found = describe(tree, ALIASES.get(name, name))
            table[f"{module}.{name}"] = {"nxdi": f"{path}:{ALIASES.get(name, name)}", **(found or {"kind": "absent"})}
    out = Path(__file__).parents[1] / "tests" / "data" / "nxdi_signatures.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {out}: {len(table) - 1} names")


if __name__ == "__main__":
    main()
