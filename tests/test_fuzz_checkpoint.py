"""Damaged checkpoints: whatever the bytes, a load raises CheckpointError and changes
nothing, or restores exactly the saved state (checkpoint_cases.LoadProperty).

Bit flips spread over the whole file, then Hypothesis mutations (flips, overwritten
and deleted ranges, insertions, truncations). FASTDESCENT_FUZZ_EXAMPLES raises the
number of Hypothesis examples; CI also runs fuzz_checkpoint.py (an exhaustive
single-bit sweep and atheris)."""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from checkpoint_cases import LoadProperty

EXAMPLES = int(os.environ.get("FASTDESCENT_FUZZ_EXAMPLES", "150"))


@pytest.fixture(scope="module")
def loads(tmp_path_factory):
    prop = LoadProperty(tmp_path_factory.mktemp("fuzz"))
    assert prop.check(prop.original)
    return prop


def test_bit_flips_across_the_file(loads):
    data = loads.original
    rng = np.random.default_rng(0)
    positions = rng.choice(len(data) * 8, size=min(2000, len(data) * 8), replace=False)
    loaded = 0
    for bit in positions:
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        loaded += loads.check(bytes(flipped))
    # Zip fields nothing reads (timestamps, "made by", the local sizes) load unharmed;
    # nothing else may.
    assert loaded < len(positions) // 4


def test_the_header_length_flip_of_issue_14_is_caught(loads):
    """Bit 5 of a member's .npy header length (118 -> 86) loaded shifted arrays."""
    data = loads.original
    hits = 0
    for start in range(len(data) - 10):
        if data[start:start + 10] == b"\x93NUMPY\x01\x00\x76\x00":
            flipped = bytearray(data)
            flipped[start + 8] ^= 0x20
            assert not loads.check(bytes(flipped))
            hits += 1
    assert hits >= 10


@st.composite
def mutations(draw, size):
    """A list of edits of a ``size``-byte file: (kind, position, payload)."""
    edits = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "overwrite", "delete", "insert", "truncate"]))
        position = draw(st.integers(0, size - 1))
        if kind == "flip":
            payload = draw(st.integers(1, 255))
        elif kind in ("overwrite", "insert"):
            payload = draw(st.binary(min_size=1, max_size=16))
        else:
            payload = draw(st.integers(1, 64))
        edits.append((kind, position, payload))
    return edits


def mutate(data, edits):
    data = bytearray(data)
    for kind, position, payload in edits:
        position = min(position, max(len(data) - 1, 0))
        if kind == "flip" and data:
            data[position] ^= payload
        elif kind == "overwrite":
            data[position:position + len(payload)] = payload
        elif kind == "delete":
            del data[position:position + payload]
        elif kind == "insert":
            data[position:position] = payload
        elif kind == "truncate":
            del data[len(data) - payload:]
    return bytes(data)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_files_raise_or_load_exactly(loads, data):
    edits = data.draw(mutations(len(loads.original)))
    loads.check(mutate(loads.original, edits))
