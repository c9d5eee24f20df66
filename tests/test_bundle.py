"""The owner bundle envelope: round trip, file mode, and every way a hostile file is refused."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import auditor
from auditor.bundle import (
    BUNDLE_FORMAT,
    BUNDLE_VERSION,
    MAX_BUNDLE_BYTES,
    OwnerBundle,
    canonical_json,
    load_bundle,
    save_bundle,
)
from auditor.errors import InputError, UsageError

PAYLOAD: dict[str, Any] = {
    "message": "© 2024 Example Owner",
    "signature": "c2lnbmF0dXJl",
    "layers": [{"name": "features.0", "shape": [64, 3, 3, 3]}],
    "ratio": 0.25,
    "nested": {"b": [1, 2.5, None, True], "a": "z"},
}
ALTERED = "the bundle was altered: its payload does not match its recorded hash"


def document(**changes: Any) -> dict[str, Any]:
    """A valid bundle document with ``changes`` applied (a value of ... removes the field)."""
    doc: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "scheme": "greedy_residuals",
        "secret": False,
        "created_by": "auditor test",
        "payload": PAYLOAD,
        "payload_sha256": hashlib.sha256(canonical_json(PAYLOAD)).hexdigest(),
    }
    for key, value in changes.items():
        if value is ...:
            del doc[key]
        else:
            doc[key] = value
    return doc


def refused(path: Path) -> str:
    """The problem load_bundle reports for ``path``, checked to be one line naming the file."""
    with pytest.raises(InputError) as exc:
        load_bundle(path)
    message = str(exc.value)
    assert message.startswith(f"{path}: ")
    assert "\n" not in message
    return message[len(f"{path}: ") :]


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "owner.bundle.json"
    digest = save_bundle(path, scheme="greedy_residuals", payload=PAYLOAD)
    raw = path.read_bytes()
    assert digest == hashlib.sha256(raw).hexdigest()
    assert raw.endswith(b"}\n")
    bundle = load_bundle(path)
    assert bundle == OwnerBundle(
        scheme="greedy_residuals", version=1, payload=PAYLOAD, sha256=digest, path=path, secret=False
    )
    doc = json.loads(raw)
    assert doc == document(created_by=f"auditor {auditor.__version__}")
    assert raw.decode() == json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    assert "©" in raw.decode()  # UTF-8, not \\u escapes
    assert path.read_bytes() == raw  # loading never modifies the file
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


def test_secret_bundle_is_0600_and_plain_is_not(tmp_path: Path) -> None:
    secret = tmp_path / "hufunet.bundle.json"
    save_bundle(secret, scheme="hufunet", payload={"hmac_key": "00" * 32}, secret=True)
    assert os.stat(secret).st_mode & 0o777 == 0o600
    assert load_bundle(secret).secret is True
    plain = tmp_path / "plain.json"
    old_umask = os.umask(0o022)
    try:
        save_bundle(plain, scheme="greedy_residuals", payload={})
    finally:
        os.umask(old_umask)
    assert os.stat(plain).st_mode & 0o777 == 0o644


def test_save_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "b.json"
    save_bundle(path, scheme="s", payload={"n": 1})
    save_bundle(path, scheme="s", payload={"n": 2})
    assert load_bundle(path).payload == {"n": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["b.json"]


def test_canonical_json() -> None:
    assert canonical_json({"b": 1, "a": [1.5, "é"], "c": {"y": None, "x": True}}) == (
        '{"a":[1.5,"é"],"b":1,"c":{"x":true,"y":null}}'.encode()
    )
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError):
            canonical_json({"x": bad})


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"scheme": "", "payload": {}}, "the bundle's scheme must be a non-empty string"),
        ({"scheme": "s", "payload": [1]}, "the bundle's payload must be a dict, not list"),
        ({"scheme": "s", "payload": {"x": float("nan")}}, "the payload cannot be stored as JSON: "),
        ({"scheme": "s", "payload": {"x": object()}}, "the payload cannot be stored as JSON: "),
        ({"scheme": "s", "payload": {1: "a", "1": "b"}}, "the payload cannot be stored as JSON: "),
    ],
)
def test_save_refuses_bad_input(tmp_path: Path, kwargs: dict[str, Any], problem: str) -> None:
    path = tmp_path / "b.json"
    with pytest.raises(UsageError) as exc:
        save_bundle(path, **kwargs)
    assert str(exc.value).startswith(f"{path}: {problem}")
    assert not path.exists()


def test_save_to_missing_folder(tmp_path: Path) -> None:
    path = tmp_path / "no" / "b.json"
    with pytest.raises(UsageError) as exc:
        save_bundle(path, scheme="s", payload={})
    assert str(exc.value) == f"{path}: cannot write the bundle: No such file or directory"


def write(tmp_path: Path, content: bytes | str | dict[str, Any] | list[Any]) -> Path:
    path = tmp_path / "bundle.json"
    if isinstance(content, dict | list):
        content = json.dumps(content, indent=2)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


HOSTILE: list[tuple[str, Any, str]] = [
    ("empty", b"", "the file is empty"),
    ("blank", b"  \n", "the file is empty"),
    ("not utf-8", b'{"format": "\xff"}', "not UTF-8 text (bad byte at offset 12)"),
    ("not json", b"hello", "not valid JSON, damaged or truncated: Expecting value (line 1, column 1)"),
    (
        "truncated",
        b'{"format": "auditor-owner-bundle", "ver',
        "not valid JSON, damaged or truncated: Unterminated string starting at (line 1, column 36)",
    ),
    ("trailing data", b"{}{}", "not valid JSON, damaged or truncated: Extra data (line 1, column 3)"),
    ("nan", b'{"x": NaN}', "not valid JSON for auditor: NaN is not allowed in JSON"),
    ("infinite number", b'{"x": 1e999}', "not valid JSON for auditor: the number 1e999 is out of range"),
    (
        "too many lists",
        b"[" + b"[]," * 1_000_000 + b"[]]",
        "not an owner bundle: more than 1,000,000 objects and lists",
    ),
    (
        "duplicate key",
        b'{"format": 1, "format": 2}',
        "not valid JSON for auditor: the key 'format' appears twice in one object",
    ),
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000, "not an owner bundle: nested too deeply"),
    ("list", [1, 2], "not an owner bundle: the top level is a list, not an object"),
    ("string", '"bundle"', "not an owner bundle: the top level is a string, not an object"),
    ("no format", document(format=...), 'not an owner bundle: its "format" is not "auditor-owner-bundle"'),
    ("wrong format", document(format="other"), 'not an owner bundle: its "format" is not "auditor-owner-bundle"'),
    ("no version", document(version=...), 'not an owner bundle: the field "version" is missing'),
    (
        "string version",
        document(version="1"),
        'not an owner bundle: its "version" must be a positive integer, not a string',
    ),
    ("bool version", document(version=True), 'not an owner bundle: its "version" must be a positive integer, not true'),
    ("zero version", document(version=0), 'not an owner bundle: its "version" must be a positive integer, not 0'),
    (
        "newer version",
        document(version=2),
        "bundle version 2 was made by a newer auditor (this one reads version 1): upgrade auditor",
    ),
    ("no scheme", document(scheme=...), 'not an owner bundle: the field "scheme" is missing'),
    ("no payload", document(payload=...), 'not an owner bundle: the field "payload" is missing'),
    ("no hash", document(payload_sha256=...), 'not an owner bundle: the field "payload_sha256" is missing'),
    ("no secret", document(secret=...), 'not an owner bundle: the field "secret" is missing'),
    ("extra field", document(signature="x"), "not an owner bundle: unexpected field 'signature'"),
    ("numeric scheme", document(scheme=7), 'the field "scheme" must be a non-empty string, not 7'),
    ("empty scheme", document(scheme=""), 'the field "scheme" must be a non-empty string, not a string'),
    ("string secret", document(secret="no"), 'the field "secret" must be true or false, not a string'),
    ("list payload", document(payload=[]), 'the field "payload" must be an object, not a list'),
    ("short hash", document(payload_sha256="abc"), 'the field "payload_sha256" must be 64 lower-case hex digits'),
    ("created_by number", document(created_by=1), 'the field "created_by" must be a string, not a number'),
    ("altered payload", document(payload={**PAYLOAD, "ratio": 0.5}), ALTERED),
    (
        "lone surrogate",
        '{"format": "auditor-owner-bundle", "version": 1, "scheme": "s", "secret": false, '
        '"payload": {"x": "\\ud800"}, "payload_sha256": "' + "0" * 64 + '"}',
        "the payload holds text that is not valid Unicode",
    ),
]


@pytest.mark.parametrize(("name", "content", "problem"), HOSTILE, ids=[case[0] for case in HOSTILE])
def test_hostile_bundles(tmp_path: Path, name: str, content: Any, problem: str) -> None:
    path = write(tmp_path, content)
    before = path.read_bytes()
    assert refused(path) == problem
    assert path.read_bytes() == before


def test_missing_folder_and_oversized(tmp_path: Path, special_files: SimpleNamespace) -> None:
    assert refused(tmp_path / "nope.json") == "no such file"
    assert refused(tmp_path) == "is a folder, not an owner bundle"
    assert refused(special_files.fifo) == "is a named pipe (FIFO), not a regular file: auditor reads only regular files"
    big = tmp_path / "big.json"
    with big.open("wb") as fh:  # sparse: the size cap acts before anything is read
        fh.truncate(MAX_BUNDLE_BYTES + 1)
    assert refused(big) == "the file is too large for an owner bundle (the limit is 64 MiB)"


def test_one_character_edit_of_the_payload_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "b.json"
    save_bundle(path, scheme="greedy_residuals", payload=PAYLOAD)
    text = path.read_text()
    edited = text.replace("Example Owner", "Example Ownes")
    assert edited != text
    path.write_text(edited)
    assert refused(path) == ALTERED
    path.write_text(text.replace("64,", "65,"))
    assert refused(path) == ALTERED
    path.write_text(text)
    load_bundle(path)


def test_reformatting_is_not_an_alteration(tmp_path: Path) -> None:
    path = tmp_path / "b.json"
    save_bundle(path, scheme="greedy_residuals", payload=PAYLOAD)
    path.write_text(json.dumps(json.loads(path.read_text())))  # one line, key order kept
    assert load_bundle(path).payload == PAYLOAD


def test_truncation_is_detected_at_every_10th_byte(tmp_path: Path) -> None:
    path = tmp_path / "b.json"
    save_bundle(path, scheme="greedy_residuals", payload=PAYLOAD)
    whole = path.read_bytes()
    cut_at = [n for n in range(0, len(whole), 10) if whole[:n].rstrip() != whole.rstrip()]
    assert len(cut_at) > 20
    for n in cut_at:
        path.write_bytes(whole[:n])
        with pytest.raises(InputError):
            load_bundle(path)


def mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    buf = bytearray(data)
    for kind, position, value in edits:
        if not buf:
            buf.append(value)
            continue
        i = position % len(buf)
        if kind == 0:
            buf[i] = value
        elif kind == 1:
            del buf[i]
        else:
            buf.insert(i, value)
    return bytes(buf)


@pytest.fixture(scope="module")
def valid_bundle(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("valid") / "b.json"
    save_bundle(path, scheme="greedy_residuals", payload=PAYLOAD)
    return path.read_bytes()


edits = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=8)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
files = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda doc: json.dumps(doc).encode(), json_values),
    st.builds(
        lambda doc: json.dumps(document(**doc)).encode(),
        st.dictionaries(st.sampled_from(list(document())), json_values, max_size=3),
    ),
    st.just(None),  # the valid bundle, mutated below
)


@settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(content=files, changes=edits, mutated=st.booleans())
def test_fuzz_only_input_errors(
    tmp_path: Path, valid_bundle: bytes, content: bytes | None, changes: list[tuple[int, int, int]], mutated: bool
) -> None:
    data = valid_bundle if content is None else content
    if mutated or content is None:
        data = mutate(data, changes)
    path = tmp_path / "fuzz.json"
    path.write_bytes(data)
    try:
        bundle = load_bundle(path)
    except InputError as exc:
        assert "\n" not in str(exc)
    else:  # a mutation the envelope cannot see (whitespace, or an edit outside the payload)
        assert isinstance(bundle.payload, dict) and bundle.scheme
        assert hashlib.sha256(canonical_json(bundle.payload)).hexdigest() == json.loads(data)["payload_sha256"]
