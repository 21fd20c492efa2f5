"""Every class and function `distattn.nxdi` mirrors accepts what NxDI's accepts: its signature against NxDI's own
source (tests/data/nxdi_signatures.json, written from an NxDI checkout by tools/nxdi_signatures.py).

For each name: NxDI's positional parameters sit at the same positions in ours (a call that passes them by position
means the same), every parameter NxDI names is a parameter of ours (or ours takes **kwargs and reads it), and where
NxDI gives a default ours gives the same one (a call that leaves it out means the same). Enum members and output
fields: NxDI's are all ours. The model-code methods of each class (forward, the config API) are compared alike.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import importlib
import inspect
import json
from pathlib import Path
from typing import Any

import pytest

TABLE = json.loads((Path(__file__).parent / "data" / "nxdi_signatures.json").read_text())
NAMES = sorted(k for k in TABLE if k != "nxdi_commit")
# where NxDI's default is a name we cannot evaluate here, what ours must be
SYMBOLIC = {"QKNormPlacement.PRE_ROPE": lambda ours: getattr(ours, "name", None) == "PRE_ROPE"}
# defaults that differ on purpose (docs/migrating-from-nxdi.md says why): NxDI's model base always passes both flags;
# called alone with a kv_mgr, ours reads and writes it
DEVIATIONS = {
    "distattn.nxdi.modules.attention.attention_base.NeuronAttentionBase.forward": {"get_kv_per_layer", "update_kv_per_layer"},
}


def _ours(qualified: str) -> Any:
    module, name = qualified.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def _same_default(nxdi: str, ours: Any) -> bool:
    if nxdi in SYMBOLIC:
        return SYMBOLIC[nxdi](ours)
    try:
        value = ast.literal_eval(nxdi)
    except ValueError:
        return False
    return ours == value and type(ours) in (type(value), float if isinstance(value, int) else type(value))


def mismatches(params: list[dict], ours: inspect.Signature, where: str) -> list[str]:
    """What a call written for NxDI's signature `params` would find different in `ours`."""
    theirs_pos = [p["name"] for p in params if p["kind"] == "positional"]
    our_params = [p for p in ours.parameters.values() if p.name not in ("self", "cls")]
    our_pos = [p.name for p in our_params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in our_params)
    by_name = {p.name: p for p in our_params}
    problems = []
    if our_pos[: len(theirs_pos)] != theirs_pos:
        problems.append(f"{where}: positional parameters {our_pos} do not start with NxDI's {theirs_pos}")
    for p in params:
        if p["kind"] in ("var_positional", "var_keyword"):
            continue
        mine = by_name.get(p["name"])
        if mine is None:
            if not takes_any:
                problems.append(f"{where}: no parameter {p['name']!r}")
            continue
        if p["name"] in DEVIATIONS.get(where, ()):
            continue
        if p["default"] is not None and (mine.default is inspect.Parameter.empty or not _same_default(p["default"], mine.default)):
            problems.append(f"{where}: {p['name']}'s default is {mine.default!r}, NxDI's {p['default']}")
    return problems


@pytest.mark.parametrize("qualified", NAMES)
def test_our_signature_accepts_nxdis(qualified: str) -> None:
    entry, ours = TABLE[qualified], _ours(qualified)
    if entry["kind"] == "absent":
        pytest.skip(f"NxDI has no {entry['nxdi']} (ours is a convenience)")
    if entry["kind"] == "enum":
        assert issubclass(ours, enum.Enum) and set(entry["members"]) <= set(ours.__members__), entry
        return
    if entry["kind"] == "fields":
        fields = {f.name for f in dataclasses.fields(ours)} if dataclasses.is_dataclass(ours) else set(inspect.signature(ours).parameters)
        assert set(entry["fields"]) <= fields, sorted(set(entry["fields"]) - fields)
        return
    problems = mismatches(entry["params"], inspect.signature(ours), qualified)
    for method, params in entry.get("methods", {}).items():
        assert hasattr(ours, method), f"{qualified} has no {method}"
        problems += mismatches(params, inspect.signature(getattr(ours, method)), f"{qualified}.{method}")
    assert not problems, "\n".join(problems)


def test_the_table_covers_everything_distattn_nxdi_mirrors() -> None:
    from distattn.nxdi import SUPPORTED

    assert {f"{m}.{n}" for m, names in SUPPORTED.items() for n in names} == set(NAMES)
    assert len(TABLE["nxdi_commit"]) == 40
