"""cdcddp.ddp.meteor_random against Meteor's own `random` package (npm meteor-standalone-random)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from cdcddp.ddp.meteor_random import (
    UNMISTAKABLE_CHARS,
    RandomStream,
    create_with_seeds,
)

JS_DIR = Path(__file__).parent / "js"

# Frozen output of tests/js/random_vectors.js (Meteor's code), so the algorithm stays pinned
# even where node is missing; the live comparison below covers many more seeds.
FROZEN_VECTORS: list[dict[str, Any]] = [
    {
        "seeds": ["0123456789abcdef0123", "/collection/todos"],
        "ids": ["AG57weBSc6Aim4T6E", "rGXxWYoFnwuDptRKo"],
        "fractions": [0.1585862054489553, 0.2707852232269943],
        "hex20": "2401ea27912bc0713d47",
    },
    {
        "seeds": [0],
        "ids": ["cp9hWvhg8GSvuZ9os", "3f3k6Xo7rrHCifQhR"],
        "fractions": [0.5945264333859086, 0.8065849216654897],
        "hex20": "9c2a7eaa146ee82cd0a0",
    },
    {
        "seeds": ["Grüße, 世界 😀"],
        "ids": ["HZtHQKezQ6etToBHa", "FB7BKciSeqv6BFtvv"],
        "fractions": [0.2773945606313646, 0.5392189605627209],
        "hex20": "48e4649f61ae7c248321",
    },
]
FROZEN_STREAM = {
    "seed": "b2c4e6a8f0d1c3e5a7b9",
    "todos_ids": ["EQxrD4ZJ49N6MwnDK", "qpMAtBqenbvP8Tfab", "SSJ3t9pnTEo5YECmW"],
    "lists_ids": ["7irtK43SvKhEKfNjS"],
    "rpc_seeds": ["0e9ca66504675a657edd", "25c58c0e7baf945194f6"],
}


@pytest.fixture(scope="module")
def meteor_vectors() -> dict[str, Any]:
    node = shutil.which("node")
    # A missing node or npm package must fail loudly: this is the only check against Meteor.
    assert node is not None, "node is required for the Meteor random vectors"
    completed = subprocess.run(
        [node, "random_vectors.js"], cwd=JS_DIR, capture_output=True, text=True, timeout=30
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


def test_frozen_vectors_match() -> None:
    for vector in FROZEN_VECTORS:
        generator = create_with_seeds(*vector["seeds"])
        assert [generator.id(), generator.id()] == vector["ids"]
        generator = create_with_seeds(*vector["seeds"])
        assert [generator.fraction(), generator.fraction()] == vector["fractions"]
        assert create_with_seeds(*vector["seeds"]).hex_string(20) == vector["hex20"]


def test_frozen_method_stream_matches() -> None:
    stream = RandomStream(FROZEN_STREAM["seed"])
    # Interleaving scopes must not disturb either sequence: each scope is its own generator.
    first_todo = stream.id_for_collection("todos")
    first_list = stream.id_for_collection("lists")
    more_todos = [stream.id_for_collection("todos"), stream.id_for_collection("todos")]
    assert [first_todo, *more_todos] == FROZEN_STREAM["todos_ids"]
    assert [first_list] == FROZEN_STREAM["lists_ids"]
    assert [stream.rpc_seed("addTask"), stream.rpc_seed("addTask")] == FROZEN_STREAM["rpc_seeds"]


def test_live_vectors_match_meteor(meteor_vectors: dict[str, Any]) -> None:
    vectors = meteor_vectors["vectors"]
    assert len(vectors) >= 10
    for vector in vectors:
        seeds = vector["seeds"]
        generator = create_with_seeds(*seeds)
        assert [generator.id() for _ in range(5)] == vector["ids"], seeds
        assert generator.id(5) == vector["short_id"], seeds
        generator = create_with_seeds(*seeds)
        # Exact float equality: both sides are the same IEEE double computation.
        assert [generator.fraction() for _ in range(8)] == vector["fractions"], seeds
        generator = create_with_seeds(*seeds)
        assert generator.hex_string(20) == vector["hex20"], seeds
        assert generator.hex_string(24) == vector["hex24"], seeds
        assert generator.secret() == vector["secret"], seeds
        choices = [
            generator.choice(["x", "y", "z"]),
            generator.choice("abcdef"),
            generator.choice([1, 2, 3, 4, 5, 6, 7]),
        ]
        assert choices == vector["choices"], seeds


def test_live_method_stream_matches_meteor(meteor_vectors: dict[str, Any]) -> None:
    expected = meteor_vectors["stream"]
    stream = RandomStream(expected["seed"])
    assert [stream.id_for_collection("todos") for _ in range(3)] == expected["todos_ids"]
    assert [stream.id_for_collection("lists")] == expected["lists_ids"]
    assert [stream.rpc_seed("addTask") for _ in range(2)] == expected["rpc_seeds"]


def test_frozen_vectors_agree_with_live(meteor_vectors: dict[str, Any]) -> None:
    # Guards the frozen copy against drifting from what the script prints.
    live = {json.dumps(v["seeds"]): v for v in meteor_vectors["vectors"]}
    for vector in FROZEN_VECTORS:
        source = live[json.dumps(vector["seeds"])]
        assert source["ids"][:2] == vector["ids"]
        assert source["fractions"][:2] == vector["fractions"]
        assert source["hex20"] == vector["hex20"]
    assert meteor_vectors["stream"] == FROZEN_STREAM


def test_stream_seed_forms_are_equivalent() -> None:
    # `[].concat(seed)`: a single value and a one-element list seed the same sequences.
    assert RandomStream("abc").id_for_collection("t") == RandomStream(["abc"]).id_for_collection(
        "t"
    )
    assert (
        RandomStream("abc").generator("/collection/t").id()
        == create_with_seeds("abc", "/collection/t").id()
    )


def test_stream_without_seed_is_random_but_well_formed() -> None:
    first, second = RandomStream(None), RandomStream(None)
    assert first.seed != second.seed
    assert len(first.seed) == 1 and len(str(first.seed[0])) == 20
    doc_id = first.id_for_collection("todos")
    assert len(doc_id) == 17 and set(doc_id) <= set(UNMISTAKABLE_CHARS)


def test_object_id_hex_uses_collection_sequence() -> None:
    stream = RandomStream("seed")
    hex_id = stream.object_id_hex_for_collection("things")
    assert hex_id == create_with_seeds("seed", "/collection/things").hex_string(24)
    assert len(hex_id) == 24 and int(hex_id, 16) >= 0


def test_invalid_seeds_are_rejected() -> None:
    with pytest.raises(ValueError):
        create_with_seeds()
    with pytest.raises(TypeError):
        create_with_seeds(1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        create_with_seeds(10**21)


def test_fractions_are_in_unit_interval_and_ids_use_alphabet() -> None:
    generator = create_with_seeds("range-check")
    fractions = [generator.fraction() for _ in range(10_000)]
    assert all(0.0 <= f < 1.0 for f in fractions)
    # A crude uniformity check: each decile gets a fair share.
    deciles = [0] * 10
    for f in fractions:
        deciles[int(f * 10)] += 1
    assert min(deciles) > 850
    ids = {generator.id() for _ in range(1000)}
    assert len(ids) == 1000
    assert set("".join(ids)) <= set(UNMISTAKABLE_CHARS)


def test_random_ids_are_meteor_shaped_and_uniform() -> None:
    from collections import Counter

    from cdcddp.ddp.meteor_random import UNMISTAKABLE_CHARS, random_id

    ids = [random_id() for _ in range(3000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 17 and set(i) <= set(UNMISTAKABLE_CHARS) for i in ids)
    assert len(random_id(5)) == 5
    # Every position draws every character about equally often (51,000 draws, 55 letters).
    counts = Counter("".join(ids))
    assert set(counts) == set(UNMISTAKABLE_CHARS)
    expected = len(ids) * 17 / len(UNMISTAKABLE_CHARS)
    assert all(0.75 * expected < n < 1.25 * expected for n in counts.values())
    last = Counter(i[-1] for i in ids)  # the most significant digit is not biased either
    assert len(last) == len(UNMISTAKABLE_CHARS)
