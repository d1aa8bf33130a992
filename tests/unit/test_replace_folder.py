"""replace_folder: all or nothing, and a swap that fails loses nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from l2sweep.base import files


def fill_with(text: str):
    return lambda tmp: (tmp / "model.keras").write_text(text)


def test_a_fill_that_fails_leaves_the_previous_folder(tmp_path):
    out = tmp_path / "l2-0.01"
    files.replace_folder(out, fill_with("old"))

    def broken(tmp: Path) -> None:
        (tmp / "model.keras").write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        files.replace_folder(out, broken)
    assert (out / "model.keras").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l2-0.01"]  # no temp, no partial copy


def test_a_swap_that_fails_keeps_the_new_outputs_where_the_error_says(tmp_path, monkeypatch):
    out = tmp_path / "l2-0.01"
    files.replace_folder(out, fill_with("old"))
    rename = Path.rename

    def refuse(self: Path, target):  # the old folder cannot be moved (a busy mount, ACLs...)
        if self == out:
            raise PermissionError(13, "Permission denied")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", refuse)
    with pytest.raises(files.OutputError, match=r"l2-0.01: could not replace it \(Permission denied\); "
                                                r"the new outputs are kept in (\S+), the previous") as err:
        files.replace_folder(out, fill_with("new"))
    kept = Path(str(err.value).split("kept in ", 1)[1].split(",", 1)[0])
    assert kept.name.startswith("l2-0.01.new-") and (kept / "model.keras").read_text() == "new"
    assert (out / "model.keras").read_text() == "old"
