"""A TorchScript archive's code is never read or run, and the loader's notes say that it is there."""

from __future__ import annotations

import zipfile
from pathlib import Path

from auditor.formats import pytorch

ASSETS = Path(__file__).resolve().parents[1] / "assets"
TAIL = (
    "which auditor did not read or run; torch.jit.load would compile and run that code and unpickle constants.pkl"
    " when loading the model, and so would torch.load with weights_only=False, which hands an archive holding"
    " constants.pkl to torch.jit.load"
)


def _entries() -> dict[str, bytes]:
    with zipfile.ZipFile(ASSETS / "pt_scripted.pt") as zf:
        return {info.filename: zf.read(info) for info in zf.infolist()}


def _write(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def _notes(path: Path) -> list[str]:
    return [n for n in pytorch.load(path).notes if n.startswith("TorchScript:")]


def test_scripted_asset_names_its_code_and_constants() -> None:
    code = {name: len(data) for name, data in _entries().items() if name.startswith("pt_scripted/code/")}
    assert len(code) == 6
    listed = ", ".join(f"{name.removeprefix('pt_scripted/')!r} ({size:,d} B)" for name, size in code.items())
    assert _notes(ASSETS / "pt_scripted.pt") == [
        f"TorchScript: the archive carries 6 code entries of {sum(code.values()):,d} bytes ({listed}) and"
        f" constants.pkl (4 B), {TAIL}"
    ]


def test_checkpoints_without_code_get_no_note() -> None:
    for name in ("pt_clean.pt", "pt_legacy.pt", "pt_nested.pt"):
        assert _notes(ASSETS / name) == [], name


def test_the_code_is_never_read(tmp_path: Path) -> None:
    # Code that is not even a zip entry's own bytes any more (its CRC no longer matches): the load cannot
    # have read it, and the note still names it.
    entries = _entries()
    entries["pt_scripted/code/__torch__.py"] = b"import os\nos.system('echo owned')\n".ljust(612, b"#")
    path = _write(tmp_path / "scripted.pt", entries)
    data = bytearray(path.read_bytes())
    at = data.index(b"os.system")
    data[at : at + 2] = b"XX"
    path.write_bytes(bytes(data))
    graph = pytorch.load(path)
    assert [layer.name for layer in graph] == ["conv", "bn", "dw", "fc"]
    assert "'code/__torch__.py' (612 B)" in _notes(path)[0]


def test_many_and_hostile_code_entries_are_summarised(tmp_path: Path) -> None:
    entries = {n: d for n, d in _entries().items() if "/code/" not in n and not n.endswith("constants.pkl")}
    hostile = "code/\x1b[2J" + "y" * 500 + ".py"
    for i in range(19):
        entries[f"pt_scripted/code/m{i:02d}.py"] = b"x" * (i + 1)
    entries[f"pt_scripted/{hostile}"] = b"z" * 1000
    note = _notes(_write(tmp_path / "many.pt", entries))[0]
    named = ", ".join(f"'code/m{i:02d}.py' ({i + 1} B)" for i in range(12))
    assert note == (
        f"TorchScript: the archive carries 20 code entries of {sum(range(1, 20)) + 1000:,d} bytes ({named}, 8 more),"
        " which auditor did not read or run; torch.jit.load would compile and run that code when loading the model"
    )
    first = {n: d for n, d in entries.items() if "/code/" not in n}
    first[f"pt_scripted/{hostile}"] = b"z"
    note = _notes(_write(tmp_path / "hostile.pt", first))[0]
    assert f"({hostile[:120]!r} (1 B))" in note and "\x1b" not in note
    assert len(note) < 600


def test_constants_alone(tmp_path: Path) -> None:
    entries = {n: d for n, d in _entries().items() if "/code/" not in n}
    assert _notes(_write(tmp_path / "constants.pt", entries)) == [
        "TorchScript: the archive carries constants.pkl (4 B), which auditor did not read or run; torch.jit.load"
        " would unpickle constants.pkl when loading the model, and so would torch.load with weights_only=False,"
        " which hands an archive holding constants.pkl to torch.jit.load"
    ]
