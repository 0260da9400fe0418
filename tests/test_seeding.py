"""The registry of random-stream ids (mmpfl_core.seeding.Stream): one id per stream, and no module bypasses it."""

from __future__ import annotations

import ast
import enum
import re
from pathlib import Path

import pytest
import torch

import mmpfl_core
from mmpfl_core.seeding import Stream, numpy_generator, torch_generator

PACKAGE = Path(mmpfl_core.__file__).parent
# A module-level integer stream constant, alone or in a tuple assignment: `_X_STREAM = 41`,
# `_A_STREAM, _B_STREAM = 1, 2`, `_COIN, _SAMPLING = 81, 82` (the neighbours module's old spelling).
_STREAM_NAME = re.compile(r"^_([A-Z0-9_]*STREAM[A-Z0-9_]*|COIN|SAMPLING|SPLIT|MASK)$")


def _registry_values_from_source() -> list[tuple[str, int]]:
    """The (name, value) pairs as written in ``class Stream``, read from the source.

    Read from the AST rather than from the enum so that a duplicate is seen even if ``@enum.unique``
    were dropped (an IntEnum silently makes a duplicate an alias, which iteration then hides).
    """
    tree = ast.parse((PACKAGE / "seeding.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Stream")
    return [
        (stmt.targets[0].id, stmt.value.value)
        for stmt in cls.body
        if isinstance(stmt, ast.Assign)
        and isinstance(stmt.targets[0], ast.Name)
        and isinstance(stmt.value, ast.Constant)
        and isinstance(stmt.value.value, int)
    ]


def _duplicates(pairs: list[tuple[str, int]]) -> dict[int, list[str]]:
    seen: dict[int, list[str]] = {}
    for name, value in pairs:
        seen.setdefault(value, []).append(name)
    return {v: names for v, names in seen.items() if len(names) > 1}


def test_stream_ids_are_unique_in_the_source() -> None:
    pairs = _registry_values_from_source()
    assert len(pairs) == len(Stream) >= 17, "the AST scan must see every member of Stream"
    assert _duplicates(pairs) == {}


def test_duplicate_check_flags_a_duplicate() -> None:
    # The check above must fail on the collision this registry was made to remove (41 used twice).
    assert _duplicates([("DP_NOISE", 41), ("SCORE_RELEASE", 41), ("FISHER_NOISE", 42)]) == {
        41: ["DP_NOISE", "SCORE_RELEASE"]
    }
    with pytest.raises(ValueError, match="duplicate values"):

        @enum.unique
        class _Broken(enum.IntEnum):
            A = 41
            B = 41


def test_no_module_defines_its_own_stream_constant() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "seeding.py":
            continue
        for node in ast.parse(path.read_text()).body:
            if not isinstance(node, ast.Assign):
                continue
            for target in node.targets:
                names = target.elts if isinstance(target, ast.Tuple) else [target]
                offenders += [
                    f"{path.relative_to(PACKAGE)}:{node.lineno} {n.id}"
                    for n in names
                    if isinstance(n, ast.Name) and _STREAM_NAME.match(n.id)
                ]
    assert offenders == [], f"stream ids belong in mmpfl_core.seeding.Stream: {offenders}"


def test_once_colliding_streams_now_draw_differently() -> None:
    # DP-FedAvg's release noise and MM-PFL-ADP's score-release noise at the same (seed, round, site)
    # were the same draw while both used id 41.
    a = torch.randn(64, generator=torch_generator(0, Stream.DP_NOISE, 1, 2))
    b = torch.randn(64, generator=torch_generator(0, Stream.SCORE_RELEASE, 1, 2))
    assert not torch.equal(a, b)
    same = torch.randn(64, generator=torch_generator(0, 41, 1, 2))
    assert torch.equal(a, same), "an IntEnum member must address the same stream as its integer value"
    coin = numpy_generator(0, Stream.NEIGHBOUR_COIN).random(64)
    boot = numpy_generator(0, Stream.ATTACK_BOOTSTRAP).random(64)
    assert not (coin == boot).all()


def test_existing_ids_kept() -> None:
    # Recorded results depend on these values; only the two colliding sides moved (41 -> 43, 81 -> 85).
    assert {s.name: int(s) for s in Stream} == {
        "SAMPLING": 1,
        "TRAINING": 2,
        "EVAL_BOOTSTRAP": 3,
        "FEDREP": 31,
        "DITTO": 32,
        "FINETUNE": 33,
        "DP_NOISE": 41,
        "FISHER_NOISE": 42,
        "SCORE_RELEASE": 43,
        "CANARY_COIN": 71,
        "CANARY_SAMPLING": 72,
        "NEIGHBOUR_COIN": 81,
        "NEIGHBOUR_SAMPLING": 82,
        "NEIGHBOUR_SPLIT": 83,
        "NEIGHBOUR_MASK": 84,
        "ATTACK_BOOTSTRAP": 85,
        "PUBLIC_SCAN": 91,
        "LEARNING_CURVE": 61,
    }
