"""The SSE decoder, one WHATWG parsing rule per test, then property tests over chunkings and line endings."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from conversations.genesys.eventstream import SSEDecoder, SSEMessage


def decode(*chunks: bytes, last_event_id: str | None = None) -> list[SSEMessage]:
    decoder = SSEDecoder(last_event_id=last_event_id)
    return [message for chunk in chunks for message in decoder.feed(chunk)]


def datas(*chunks: bytes) -> list[str]:
    return [message.data for message in decode(*chunks)]


# Dispatch


def test_an_event_is_dispatched_on_a_blank_line() -> None:
    assert decode(b"data: hello\n\n") == [SSEMessage(event="message", data="hello", id=None)]


def test_nothing_is_dispatched_before_the_blank_line() -> None:
    assert decode(b"data: hello\n") == []


def test_an_event_is_returned_by_the_feed_that_completes_it() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: one\n") == []
    assert [m.data for m in decoder.feed(b"\ndata: tw")] == ["one"]
    assert [m.data for m in decoder.feed(b"o\n\n")] == ["two"]


def test_a_blank_line_without_data_dispatches_nothing() -> None:
    assert decode(b"\n\n\n") == []


def test_an_unfinished_event_at_the_end_of_the_stream_is_not_dispatched() -> None:
    assert datas(b"data: one\n\ndata: two\n") == ["one"]


# Line ends


def test_lf_ends_a_line() -> None:
    assert datas(b"data: a\n\n") == ["a"]


def test_cr_alone_ends_a_line() -> None:
    assert datas(b"data: a\r\r") == ["a"]


def test_crlf_ends_a_line_once() -> None:
    assert datas(b"data: a\r\ndata: b\r\n\r\n") == ["a\nb"]


def test_lf_cr_is_two_line_ends() -> None:
    assert datas(b"data: a\n\rdata: b\n\n") == ["a", "b"]


def test_a_cr_ending_one_chunk_and_an_lf_starting_the_next_are_one_line_end() -> None:
    assert datas(b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n") == ["a\nb"]


def test_a_cr_ending_a_chunk_followed_by_an_empty_chunk_still_pairs_with_the_lf() -> None:
    assert datas(b"data: a\r", b"", b"\n", b"\r\n") == ["a"]


def test_a_cr_ending_a_chunk_is_a_line_end_at_once() -> None:
    decoder = SSEDecoder()
    assert [m.data for m in decoder.feed(b"data: a\r\r")] == ["a"]


def test_other_unicode_line_breaks_do_not_end_lines() -> None:
    assert datas("data: a\x0bb\x0cc\x1cd\x85e\u2028f\n\n".encode()) == ["a\x0bb\x0cc\x1cd\x85e\u2028f"]


# BOM


def test_a_leading_bom_is_stripped() -> None:
    assert datas(b"\xef\xbb\xbfdata: a\n\n") == ["a"]


def test_a_bom_split_across_chunks_is_stripped() -> None:
    assert datas(b"\xef", b"\xbb", b"\xbfdata: a\n\n") == ["a"]


def test_only_one_leading_bom_is_stripped() -> None:
    # The second BOM becomes part of the first field name, so the line is an unknown field.
    assert datas(b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\ndata: b\n\n") == ["b"]


def test_a_bom_after_the_stream_start_is_not_stripped() -> None:
    assert datas(b"data: a\n\n\xef\xbb\xbfdata: b\n\ndata: \xef\xbb\xbfc\n\n") == ["a", "\ufeffc"]


def test_a_new_stream_after_reset_may_start_with_its_own_bom() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"\xef\xbb\xbfdata: a\n\n")
    decoder.reset()
    assert [m.data for m in decoder.feed(b"\xef\xbb\xbfdata: b\n\n")] == ["b"]


# UTF-8


def test_a_multi_byte_character_split_across_chunks_is_decoded() -> None:
    encoded = "data: Zoë €𝄞\n\n".encode()
    assert datas(*(encoded[i : i + 1] for i in range(len(encoded)))) == ["Zoë €𝄞"]


def test_invalid_utf8_is_replaced_not_fatal() -> None:
    assert datas(b"data: a\xffb\n\n") == ["a\ufffdb"]


# Comments and fields


def test_comment_lines_are_ignored() -> None:
    assert decode(b": keep-alive\n:\ndata: a\n: between\n\n") == [SSEMessage("message", "a", None)]


def test_a_comment_alone_dispatches_nothing() -> None:
    assert decode(b": ping\n\n") == []


def test_one_leading_space_is_stripped_from_a_value() -> None:
    assert datas(b"data: a\n\n") == ["a"]


def test_only_the_first_leading_space_is_stripped() -> None:
    assert datas(b"data:   a \n\n") == ["  a "]


def test_a_value_without_a_leading_space_is_kept_whole() -> None:
    assert datas(b"data:a\n\n") == ["a"]


def test_colons_after_the_first_belong_to_the_value() -> None:
    assert datas(b'data: {"a": "b:c"}\n\n') == ['{"a": "b:c"}']


def test_a_line_without_a_colon_is_a_field_name_with_an_empty_value() -> None:
    assert datas(b"data\ndata\n\n") == ["\n"]


def test_field_names_are_case_sensitive() -> None:
    assert decode(b"Data: a\nEVENT: x\n\n") == []


def test_unknown_fields_are_ignored() -> None:
    assert decode(b"foo: bar\ndata: a\nfoo\n\n") == [SSEMessage("message", "a", None)]


# data


def test_multi_line_data_is_joined_with_newlines() -> None:
    assert datas(b"data: one\ndata: two\ndata: three\n\n") == ["one\ntwo\nthree"]


def test_the_final_newline_of_the_data_buffer_is_removed() -> None:
    assert datas(b"data: a\ndata:\n\n") == ["a\n"]


def test_an_empty_data_line_is_an_event_with_empty_data() -> None:
    assert decode(b"data:\n\n") == [SSEMessage("message", "", None)]


# event


def test_the_event_type_defaults_to_message() -> None:
    assert decode(b"data: a\n\n")[0].event == "message"


def test_the_event_field_sets_the_type() -> None:
    assert decode(b"event: conversation:start\ndata: a\n\n")[0].event == "conversation:start"


def test_an_empty_event_field_means_message() -> None:
    assert decode(b"event:\ndata: a\n\n")[0].event == "message"


def test_the_event_type_does_not_carry_over_to_the_next_event() -> None:
    assert [m.event for m in decode(b"event: x\ndata: a\n\ndata: b\n\n")] == ["x", "message"]


def test_the_event_type_of_an_event_without_data_is_forgotten() -> None:
    assert [m.event for m in decode(b"event: x\n\ndata: b\n\n")] == ["message"]


# id


def test_the_id_is_attached_to_its_event_and_becomes_the_last_event_id() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"id: 7\ndata: a\n\n") == [SSEMessage("message", "a", "7")]
    assert decoder.last_event_id == "7"


def test_the_last_event_id_persists_across_events_without_an_id() -> None:
    assert [m.id for m in decode(b"id: 7\ndata: a\n\ndata: b\n\nid: 8\ndata: c\n\n")] == ["7", "7", "8"]


def test_an_id_containing_nul_is_ignored() -> None:
    assert [m.id for m in decode(b"id: 7\ndata: a\n\nid: 8\x009\ndata: b\n\n")] == ["7", "7"]


def test_an_empty_id_clears_the_last_event_id() -> None:
    decoder = SSEDecoder()
    messages = decoder.feed(b"id: 7\ndata: a\n\nid\ndata: b\n\n")
    assert [m.id for m in messages] == ["7", None]
    assert decoder.last_event_id is None


def test_an_event_without_data_still_updates_the_last_event_id() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"id: 9\n\n") == []
    assert decoder.last_event_id == "9"


def test_the_last_event_id_moves_only_when_the_event_is_complete() -> None:
    decoder = SSEDecoder(last_event_id="3")
    decoder.feed(b"id: 4\ndata: half")
    assert decoder.last_event_id == "3"


def test_the_constructor_id_is_in_effect_until_the_stream_sends_one() -> None:
    assert [m.id for m in decode(b"data: a\n\nid: 12\ndata: b\n\n", last_event_id="11")] == ["11", "12"]


# retry


def test_retry_with_ascii_digits_sets_the_reconnection_time() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"retry: 2500\n\n")
    assert decoder.retry == 2500


def test_retry_with_anything_but_ascii_digits_is_ignored() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"retry: 100\nretry: 1a\nretry:  5\nretry: -5\nretry:\nretry: 1.5\n")
    decoder.feed("retry: \u0661\u0662\n\n".encode())  # Arabic-Indic digits are digits, not ASCII digits
    assert decoder.retry == 100


def test_a_retry_line_alone_dispatches_nothing() -> None:
    assert decode(b"retry: 100\n\n") == []


# reset (a new connection)


def test_reset_drops_a_half_received_event() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"id: 1\ndata: a\n\nid: 2\ndata: half of b")
    decoder.reset()
    assert decoder.feed(b"data: c\n\n") == [SSEMessage("message", "c", "1")]


def test_reset_drops_a_half_received_line() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"data: a\n\nda")
    decoder.reset()
    assert [m.data for m in decoder.feed(b"ta: x\ndata: b\n\n")] == ["b"]


def test_reset_forgets_a_pending_cr() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"data: a\r")
    decoder.reset()
    # On the new stream the LF is a line end of its own: an empty line, so nothing to dispatch yet.
    assert [m.data for m in decoder.feed(b"\ndata: b\n\n")] == ["b"]


def test_reset_keeps_the_last_event_id() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"id: 5\ndata: a\n\n")
    decoder.reset()
    assert decoder.last_event_id == "5"


# Large input


def test_ten_thousand_events_fed_in_large_chunks_all_arrive() -> None:
    event = (
        b'id: 123456\nevent: conversation:update\ndata: {"eventType": "conversation:update", "x": "'
        + (b"y" * 400)
        + b'"}\n\n'
    )
    stream = event * 10_000
    decoder = SSEDecoder()
    count = sum(len(decoder.feed(stream[i : i + 16384])) for i in range(0, len(stream), 16384))
    assert count == 10_000


# Properties

_TEXT = st.text(
    alphabet=st.one_of(
        st.sampled_from("abc :é€𝄞\ufeff\x00\t"),
        st.characters(exclude_categories=["Cs"], exclude_characters="\r\n"),
    ),
    max_size=12,
)
_LINE = st.one_of(
    st.builds(lambda v: f"data: {v}", _TEXT),
    st.builds(lambda v: f"data:{v}", _TEXT),
    st.just("data"),
    st.builds(lambda v: f"event: {v}", _TEXT),
    st.builds(lambda v: f"id: {v}", _TEXT),
    st.builds(lambda v: f"retry: {v}", st.integers(0, 10**6).map(str) | _TEXT),
    st.builds(lambda v: f":{v}", _TEXT),
    st.builds(lambda v: f"x-{v}", _TEXT),
    st.just(""),
    st.just(""),
)
_LINES = st.lists(_LINE, max_size=30)


def _render(lines: list[str], ending: str, *, bom: bool) -> bytes:
    return ("\ufeff" if bom else "").encode() + "".join(line + ending for line in lines).encode()


def _feed_all(decoder: SSEDecoder, chunks: list[bytes]) -> tuple[list[SSEMessage], str | None, int | None]:
    messages = [message for chunk in chunks for message in decoder.feed(chunk)]
    return messages, decoder.last_event_id, decoder.retry


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted({cut % (len(data) + 1) for cut in cuts}), len(data)]
    return [data[start:end] for start, end in itertools.pairwise(points)]


@settings(max_examples=300, deadline=None)
@given(
    lines=_LINES,
    endings=st.lists(st.sampled_from(["\n", "\r", "\r\n"]), min_size=1, max_size=30),
    bom=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=40),
)
def test_any_chunking_gives_the_same_messages_as_the_whole_stream(
    lines: list[str], endings: list[str], bom: bool, cuts: list[int]
) -> None:
    # Endings mixed line by line, so cuts land between CR and LF and inside multi-byte characters too.
    text = "".join(line + endings[i % len(endings)] for i, line in enumerate(lines))
    data = ("\ufeff" if bom else "").encode() + text.encode()
    whole = _feed_all(SSEDecoder(), [data])
    assert _feed_all(SSEDecoder(), _split(data, cuts)) == whole
    assert _feed_all(SSEDecoder(), [data[i : i + 1] for i in range(len(data))]) == whole


@settings(max_examples=300, deadline=None)
@given(
    lines=_LINES, bom=st.booleans(), cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=20)
)
def test_lf_cr_and_crlf_line_endings_give_the_same_messages(
    lines: list[str], bom: bool, cuts: list[int]
) -> None:
    results = [
        _feed_all(SSEDecoder(), _split(_render(lines, ending, bom=bom), cuts))
        for ending in ("\n", "\r", "\r\n")
    ]
    assert results[0] == results[1] == results[2]


@settings(max_examples=300, deadline=None)
@given(
    lines=_LINES, bom=st.booleans(), cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=20)
)
def test_the_decoder_agrees_with_a_literal_reading_of_the_standard(
    lines: list[str], bom: bool, cuts: list[int]
) -> None:
    data = _render(lines, "\r\n", bom=bom)
    assert _feed_all(SSEDecoder(), _split(data, cuts))[0] == _reference(data)


def _reference(data: bytes) -> list[SSEMessage]:
    """The WHATWG algorithm written out character by character, slow and obvious, as an oracle."""
    text = data.decode("utf-8", errors="replace")
    text = text[1:] if text.startswith("\ufeff") else text
    lines, line, i = [], "", 0
    while i < len(text):
        char = text[i]
        if char in "\r\n":
            lines.append(line)
            line = ""
            if char == "\r" and text[i + 1 : i + 2] == "\n":
                i += 1
        else:
            line += char
        i += 1
    messages: list[SSEMessage] = []
    data_buffer, event_type, id_buffer, retry = "", "", "", None
    for line in lines:
        if line == "":
            last_id = id_buffer
            if data_buffer:
                messages.append(SSEMessage(event_type or "message", data_buffer[:-1], last_id or None, retry))
            data_buffer, event_type = "", ""
            continue
        if line.startswith(":"):
            continue
        if ":" in line:
            name, value = line.split(":", 1)
            value = value[1:] if value.startswith(" ") else value
        else:
            name, value = line, ""
        if name == "event":
            event_type = value
        elif name == "data":
            data_buffer += value + "\n"
        elif name == "id" and "\x00" not in value:
            id_buffer = value
        elif name == "retry" and value and all(c in "0123456789" for c in value):
            retry = int(value)
    return messages
