"""The guest cache's builder never removes a folder it did not make (``--cache`` is the user's)."""

from pathlib import Path

import pytest

from vnvme.vm import provision
from vnvme.vm.provision import CACHE_MARK, Provisioner, ProvisionError


class _Stop(Exception):
    pass


def _no_build(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Stop at the first command the build would run (no apt, no debootstrap)."""
    ran: list[list[str]] = []

    def run(argv: list[str], **_: object) -> str:
        ran.append(argv)
        raise _Stop

    monkeypatch.setattr(provision, "_run", run)
    monkeypatch.setattr(Provisioner, "_host_tools", lambda self: None)
    return ran


@pytest.mark.parametrize("name", ["trixie", "trixie.partial"])
def test_a_folder_of_the_users_is_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    ran = _no_build(monkeypatch)
    theirs = tmp_path / name / "notes.txt"
    theirs.parent.mkdir()
    theirs.write_text("mine")
    with pytest.raises(ProvisionError, match="not made by vnvme"):
        Provisioner(tmp_path, say=lambda _: None)._bootstrap()
    assert theirs.read_text() == "mine"
    assert ran == []


def test_its_own_unfinished_build_is_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ran = _no_build(monkeypatch)
    (tmp_path / CACHE_MARK).write_text("vnvme guest cache\n")
    left = tmp_path / "trixie.partial" / "etc"
    left.mkdir(parents=True)
    with pytest.raises(_Stop):
        Provisioner(tmp_path, say=lambda _: None)._bootstrap()
    assert not left.exists()
    assert ran and ran[0][0] == "debootstrap"


def test_a_root_made_before_the_mark_is_still_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_build(monkeypatch)
    stamps = tmp_path / "trixie" / "opt" / "vnvme"
    stamps.mkdir(parents=True)
    with pytest.raises(_Stop):
        Provisioner(tmp_path, say=lambda _: None)._bootstrap()
    assert not stamps.exists()
    assert (tmp_path / CACHE_MARK).exists()
