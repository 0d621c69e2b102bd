"""JSON mode: the byte-level automaton, the grammar's token masks on the real vocabulary, and the engine."""

from __future__ import annotations

import json
import random
from collections.abc import Callable

import pytest
import torch

from tertulia.engine.engine import Engine
from tertulia.engine.json_mode import (
    INVALID as NO_WAY,
)
from tertulia.engine.json_mode import (
    LOOP_SPAN,
    MAX_DEPTH,
    MAX_NEWLINES,
    MAX_WHITESPACE,
    START,
    JsonConstraint,
    JsonGrammar,
    State,
    advance,
    closing,
    closing_length,
    step,
)
from tertulia.engine.sampling import SamplingParams
from tertulia.engine.sequence import Sequence
from tertulia.models.registry import LoadedModel
from tertulia.models.tokenizer import Tokenizer

from .test_engine import random_prompt, run

MakeModel = Callable[..., LoadedModel]
SP = " " * MAX_WHITESPACE

VALID = [
    "{\n" + " " * MAX_WHITESPACE + '"deep": 1\n\n}',  # indentation counts from the last newline
    "{}",
    '{"a": []}',
    ' \t{\r\n "a" :\t{ "b" : [ 1 , [ ] , { } , "x" ] } \n}',
    r'{"s": "tab\t q\" sl\/ bs\\ \b\f\n\r \u00e9 \uD83D\uDE00 \u00E9"}',
    '{"café": "naïve — 日本語 😀", "k\u007f": "DEL is legal"}',
    '{"n": [-0, 0.5, 1e10, 2E-3, 12.5e+3, -1.25E-07, 0, 10, -0.0e0, 0e5, -0E+2]}',
    '{"t": true, "f": false, "z": null, "l": [true,false,null]}',
    '{"deep": [[[[{"x": [{}, []]}]]]]}',
    r'{"\u0041key\"": {"": ""}}',
    '{"a":1}',
    '{"a":[1]}',
    '{"a":1.5e3,"b":0}',
    "{" + SP + '"a"' + SP + ":" + SP + "1" + SP + "}",
]
INVALID = [  # (document, index of the first byte the automaton must refuse); json.loads refuses them too
    ('{"a":1,}', 7),
    ('{"a":[1,]}', 8),
    ('{"a":01}', 6),
    ('{"a":-01}', 7),
    ('{"a":1.}', 7),
    ('{"a":.5}', 5),
    ('{"a":+1}', 5),
    ('{"a":-}', 6),
    ('{"a":1e}', 7),
    ('{"a":1e+}', 8),
    ('{"a" 1}', 5),
    ("{'a':1}", 1),
    ('{"a":"x\ny"}', 7),
    ('{"a":"x\x1fy"}', 7),
    ('{"a":"\ty"}', 6),
    (r'{"a":"\x"}', 7),
    (r'{"a":"\u12"}', 10),
    (r'{"a":"\u123"}', 11),
    (r'{"a":"\u12G4"}', 10),
    ("{a:1}", 1),
    ('{"a":tru}', 8),
    ('{"a":True}', 5),
    ('{"a":1 2}', 7),
    ('{"a":[1}', 7),
    ('{"a":{"b":1]}', 11),
    ('{"a":1}}', 7),
    ("{}{}", 2),
]
NOT_JSON_MODE = [  # valid JSON for json.loads, but not a JSON-mode output
    ("[1]", 0),
    ('"a"', 0),
    ("1", 0),
    ("true", 0),
    ("{}\n", 2),
    (" " * (MAX_WHITESPACE + 1) + "{}", MAX_WHITESPACE),
    ("{" + " \t\r" * (MAX_WHITESPACE // 3) + "  }", MAX_WHITESPACE + 1),
    ("{" + "\n" * (MAX_NEWLINES + 1) + "}", MAX_NEWLINES + 1),
    ('{"a":' + " " * (MAX_WHITESPACE + 5) + "1}", 5 + MAX_WHITESPACE),
]


def modes(data: bytes) -> list[str | None]:
    """The automaton's mode after each byte (None from the first refused byte on)."""
    result: list[str | None] = []
    state: State | None = START
    for byte in data:
        state = step(state, byte) if state is not None else None
        result.append(state.mode if state is not None else None)
    return result


def assert_accepted(doc: str) -> None:
    got = modes(doc.encode())
    assert None not in got and "done" not in got[:-1] and got[-1] == "done", doc
    assert getattr(advance(START, doc.encode()), "mode", None) == "done"


@pytest.mark.parametrize("doc", VALID)
def test_accepts_valid_objects_and_is_done_at_the_closing_brace(doc: str) -> None:
    assert isinstance(json.loads(doc), dict)
    assert_accepted(doc)


@pytest.mark.parametrize(("doc", "index"), INVALID + NOT_JSON_MODE)
def test_rejects_at_the_first_bad_byte(doc: str, index: int) -> None:
    if (doc, index) in INVALID:
        with pytest.raises(json.JSONDecodeError):
            json.loads(doc)
    got = modes(doc.encode())
    assert None not in got[:index] and got[index] is None, doc
    assert advance(START, doc.encode()) is None


@pytest.mark.parametrize(
    ("data", "index"),
    [
        (b'{"a": "\xe6"}', 8),  # a lead byte without its continuation bytes
        (b'{"a": "\x80"}', 7),  # a continuation byte with no lead
        (b'{"\xc3\xa9\xe2\x82"}', 6),  # a three-byte character cut after two bytes
        (b'{"a": "\xff"}', 7),  # never a UTF-8 byte
    ],
)
def test_strings_must_be_well_formed_utf8(data: bytes, index: int) -> None:
    got = modes(data)
    assert None not in got[:index] and got[index] is None
    assert advance(START, '{"é€😀": "日本"}'.encode()) is not None


def random_value(rng: random.Random, depth: int) -> object:
    kind = rng.randrange(9 if depth < 4 else 6)
    if kind == 0:
        return rng.choice([True, False, None])
    if kind == 1:
        return rng.randint(-(10**12), 10**12)
    if kind == 2:
        return rng.choice([-1.0, 1.0]) * rng.random() * 10 ** rng.randint(-30, 30)
    if kind in (3, 4, 5):
        alphabet = 'ab "\\/\n\t\x00\x1f\x7féü€日😀\u2028'
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(8)))
    if kind in (6, 7):
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return random_object(rng, depth + 1)


def random_object(rng: random.Random, depth: int = 0) -> dict[str, object]:
    return {str(random_value(rng, 4)): random_value(rng, depth) for _ in range(rng.randrange(5))}


def test_random_json_dumps_are_accepted() -> None:
    rng = random.Random(20240601)
    for _ in range(400):
        obj = random_object(rng)
        doc = json.dumps(
            obj,
            indent=rng.choice([None, 0, 1, 2, 4, "\t"]),
            separators=rng.choice([None, (",", ":"), (", ", ": "), (" ,  ", " : ")]),
            ensure_ascii=rng.choice([True, False]),
        )
        assert json.loads(doc) == obj
        assert_accepted(doc)


def as_text(data: bytes) -> str:
    """What the detokenizer shows for these bytes (a malformed character becomes U+FFFD)."""
    return data.decode("utf-8", errors="replace")


def test_every_prefix_closes_by_the_shortest_way() -> None:
    """From any point of any object, `closing` completes it, and each of its bytes shortens it by one."""
    rng = random.Random(7)
    docs = [*VALID] + [
        json.dumps(random_object(rng), ensure_ascii=False, indent=rng.choice([None, 1])) for _ in range(60)
    ]
    for doc in docs:
        data = doc.encode()
        for cut in range(len(data)):
            state = advance(START, data[:cut])
            ending = closing(state)
            assert len(ending) == closing_length(state)
            assert isinstance(json.loads(as_text(data[:cut] + ending)), dict), data[:cut] + ending
            if ending:
                after = step(state, ending[0])
                assert after is not None and closing(after) == ending[1:]


def test_nesting_is_bounded() -> None:
    assert advance(START, b'{"a":' + b"[" * (MAX_DEPTH - 1)) is not None
    assert advance(START, b'{"a":' + b"[" * MAX_DEPTH) is None
    assert closing_length(advance(START, b'{"a":' + b"[" * (MAX_DEPTH - 1))) < NO_WAY


# --- token masks on the real vocabulary -----------------------------------------------------------


@pytest.fixture(scope="module")
def grammar(real_tokenizer: Tokenizer) -> JsonGrammar:
    return JsonGrammar(real_tokenizer.token_bytes)


PREFIXES = [
    b"",
    b'{"ke',
    b'{"key"',
    b'{"key": ',
    b'{"a": "va',
    b'{"a": "\xe2\x82',
    b'{"a": "\\u00',
    b'{"a": -',
    b'{"a": 12',
    b'{"a": 1.5e',
    b'{"a": tr',
    b'{"a": [[1], "x"',
    b'{"a": 1,',
    b"{" + SP.encode(),
]


@pytest.mark.parametrize("prefix", PREFIXES)
def test_mask_equals_brute_force(grammar: JsonGrammar, prefix: bytes) -> None:
    state = advance(START, prefix)
    assert state is not None
    expected = torch.tensor([bool(b) and advance(state, b) is not None for b in grammar.token_bytes])
    mask = grammar.allowed(state)
    assert mask.dtype == torch.bool and mask.shape == (49152,)
    assert 0 < int(expected.sum()) < 49152  # a real choice, so equality means something
    assert torch.equal(mask, expected), torch.nonzero(mask != expected).flatten()[:20].tolist()
    lengths = grammar.closing_lengths(state)
    assert grammar.closing_lengths(state) is lengths  # cached
    for token in torch.nonzero(expected).flatten()[::97].tolist():  # a sample: each walk is slow
        assert lengths[token] == closing_length(advance(state, grammar.token_bytes[token]))


def test_constraint_follows_tokens(grammar: JsonGrammar) -> None:
    ids = {grammar.token_bytes[i]: i for i in range(len(grammar.token_bytes))}
    constraint = JsonConstraint(grammar)
    assert constraint.mask()[ids[b"{"]] and not constraint.mask()[ids[b"["]]
    constraint.accept(ids[b"{"])
    assert torch.equal(constraint.mask(), grammar.allowed(State("key_or_close", "{")))
    with pytest.raises(ValueError):
        constraint.accept(ids[b"1"])
    assert not constraint.complete
    constraint.accept(ids[b"}"])
    assert constraint.complete and not constraint.mask().any()


# --- the engine -----------------------------------------------------------------------------------


def check_outputs(sequences: list[Sequence], tokenizer: Tokenizer, max_tokens: int) -> list[object]:
    """Every output is one JSON object, closed by its last token; "stop" when the model closed it,
    "length" when the budget did (or ran out). Returns the parsed objects."""
    parsed = []
    for seq in sequences:
        raw = b"".join(tokenizer.token_bytes[t] or b"" for t in seq.output)
        state = advance(START, raw)
        assert state is not None and state.mode == "done", seq.text
        before_last = advance(START, raw[: len(raw) - len(tokenizer.token_bytes[seq.output[-1]] or b"")])
        assert before_last is not None and before_last.mode != "done"
        parsed.append(json.loads(seq.text))
        assert isinstance(parsed[-1], dict)
        assert seq.finish_reason == ("length" if seq.constraint.cut_short else "stop")
        assert len(seq.output) <= max_tokens
    return parsed


@pytest.mark.parametrize("biased", [False, True])
def test_engine_outputs_are_json(make_tiny_model: MakeModel, biased: bool) -> None:
    model = make_tiny_model(max_position_embeddings=512)
    tb = model.tokenizer.token_bytes
    # Favouring quotes, colons and braces makes the random model write (and close) non-empty objects.
    bias = {tb.index(b): 8.0 for b in (b'"', b'":', b"}")} | {tb.index(b): 5.0 for b in (b"1", b",")}
    engine = Engine(model, max_batch=12)
    sequences = []
    for seed in range(12):
        params = SamplingParams(
            temperature=1.0, seed=seed, max_tokens=120, json_object=True, logit_bias=bias if biased else {}
        )
        sequences += engine.add(random_prompt(5, seed=seed), params)
    run(engine)
    parsed = check_outputs(sequences, model.tokenizer, 120)
    assert parsed, "no seed closed its object"
    if biased:
        assert any(parsed), parsed  # at least one non-empty object


def test_engine_n_choices_are_each_constrained(make_tiny_model: MakeModel) -> None:
    model = make_tiny_model(max_position_embeddings=512)
    engine = Engine(model)
    params = SamplingParams(temperature=1.0, seed=3, n=2, max_tokens=40, json_object=True)
    sequences = engine.add(random_prompt(6, seed=1), params)
    assert all(s.constraint is not None for s in sequences)
    assert sequences[0].constraint is not sequences[1].constraint
    run(engine)
    check_outputs(sequences, model.tokenizer, 40)
    assert sequences[0].output != sequences[1].output


@pytest.mark.parametrize("max_tokens", [2, 3, 5, 8, 13, 21, 34])
def test_a_budget_about_to_run_out_closes_the_object(make_tiny_model: MakeModel, max_tokens: int) -> None:
    """Biased to open strings, arrays and objects, a random model is made to close them all in time."""
    model = make_tiny_model(max_position_embeddings=512)
    tb = model.tokenizer.token_bytes
    bias = {tb.index(b): 6.0 for b in (b'"', b'":', b"[", b'{"', b"\\", b"tr")}
    engine = Engine(model, max_batch=8)
    sequences = []
    for seed in range(8):
        params = SamplingParams(
            temperature=1.0, seed=seed, max_tokens=max_tokens, json_object=True, logit_bias=bias
        )
        sequences += engine.add(random_prompt(5, seed=seed), params)
    run(engine)
    check_outputs(sequences, model.tokenizer, max_tokens)
    assert any(s.finish_reason == "length" for s in sequences)


def test_a_one_token_budget_gives_the_empty_object(make_tiny_model: MakeModel) -> None:
    engine = Engine(make_tiny_model())
    [seq] = engine.add(random_prompt(5), SamplingParams(temperature=0, max_tokens=1, json_object=True))
    run(engine)
    assert seq.finish_reason == "length" and seq.text.strip() == "{}"  # " {}" is one token


def test_the_context_is_a_budget_too(make_tiny_model: MakeModel) -> None:
    model = make_tiny_model(max_position_embeddings=64)
    tb = model.tokenizer.token_bytes
    bias = {tb.index(b): 6.0 for b in (b'"', b'":', b"[")}
    engine = Engine(model)
    params = SamplingParams(temperature=1.0, seed=1, json_object=True, logit_bias=bias)
    [seq] = engine.add(random_prompt(40), params)
    run(engine)
    assert seq.finish_reason == "length" and isinstance(json.loads(seq.text), dict)


def ids_of(grammar: JsonGrammar) -> dict[bytes, int]:
    return {data: token for token, data in enumerate(grammar.token_bytes) if data}


def test_a_loop_inside_a_string_closes_the_string(grammar: JsonGrammar) -> None:
    ids = ids_of(grammar)
    constraint = JsonConstraint(grammar)
    for piece in (b"{", b'"', b"a", b'":', b' "', b"F"):
        constraint.accept(ids[piece])
    unit = [ids[b"FF"], ids[b","], ids[b" "]]
    for _ in range(LOOP_SPAN // len(unit)):
        assert constraint.mask()[ids[b"FF"]], "no loop yet"
        for token in unit:
            constraint.accept(token)
    constraint.accept(unit[0])  # the unit has now filled LOOP_SPAN tokens
    mask = constraint.mask()
    assert not mask[ids[b"FF"]] and not mask[ids[b'",']]  # only what ends the string on the shortest way
    assert mask[ids[b'"']] and mask[ids[b'"}']]
    constraint.accept(ids[b'"'])
    assert constraint.mask()[ids[b","]]  # the string is closed: the model goes on freely
    assert not constraint.cut_short


def test_a_loop_of_values_closes_their_array(grammar: JsonGrammar) -> None:
    ids = ids_of(grammar)
    constraint = JsonConstraint(grammar)
    for piece in (b'{"', b"a", b'":', b" ["):
        constraint.accept(ids[piece])
    constraint.accept(ids[b"1"])
    while not constraint._must_close():
        constraint.accept(ids[b","])
        constraint.accept(ids[b"1"])
    mask = constraint.mask()
    assert mask[ids[b"]"]] and mask[ids[b"]}"]] and not mask[ids[b","]]
    constraint.accept(ids[b"]"])
    assert constraint.mask()[ids[b","]]  # back in the object, free to add keys


def test_without_finishing_the_grammar_alone_decides(grammar: JsonGrammar) -> None:
    ids = ids_of(grammar)
    constraint = JsonConstraint(grammar, finishing=False)
    constraint.accept(ids[b'{"'])
    assert torch.equal(constraint.mask(left=1), grammar.allowed(constraint.state))
    finishing = JsonConstraint(grammar)
    finishing.accept(ids[b'{"'])
    tight = finishing.mask(left=3)  # '":0}' takes 4 bytes: only tokens that shorten it fit
    assert tight[ids[b'":']] and not tight[ids[b"a"]] and finishing.cut_short
