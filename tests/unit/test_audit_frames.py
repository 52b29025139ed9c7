"""The audit writer's pipe framing: frames split anywhere in the byte stream come out whole and in order."""

from __future__ import annotations

import itertools
import struct

from hypothesis import given
from hypothesis import strategies as st

from openkms.audit.writer import FrameReader, encode

json_scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=200)
messages = st.lists(st.lists(json_scalars, max_size=12), min_size=0, max_size=20)


@given(messages, st.lists(st.integers(min_value=0, max_value=5000), max_size=30))
def test_frames_survive_any_split(sent: list[list[object]], cuts: list[int]) -> None:
    stream = b"".join(encode(m) for m in sent)
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    reader = FrameReader()
    received: list[object] = []
    for start, end in itertools.pairwise(points):
        received += reader.feed(stream[start:end])
    assert received == sent


def test_a_partial_frame_waits_for_the_rest() -> None:
    reader = FrameReader()
    frame = encode(["ack", 7, True])
    assert reader.feed(frame[:3]) == []
    assert reader.feed(frame[3:-1]) == []
    assert reader.feed(frame[-1:] + frame) == [["ack", 7, True], ["ack", 7, True]]


def test_length_prefix_is_little_endian_uint32() -> None:
    frame = encode(["rows", 1, []])
    assert struct.unpack_from("<I", frame)[0] == len(frame) - 4
