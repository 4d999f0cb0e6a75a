"""The lock files in requirements/: every install (make demo, make test, the image) takes exact versions with
hashes, each file holds what its install needs and nothing more, and they agree with pyproject.toml."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LOCKS = ("production", "demo", "test")
TEST_TOOLS = {"pytest", "pytest-django", "hypothesis", "playwright", "purecloudplatformclientv2"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned(lock: str) -> dict[str, str]:
    """Package -> version, for the `name==version` lines of one lock file."""
    text = (ROOT / "requirements" / f"{lock}.txt").read_text()
    return {canonical(m[1]): m[2] for m in re.finditer(r"^([A-Za-z0-9_.\-]+)==(\S+)", text, re.MULTILINE)}


def requirement_names(requirements: list[str]) -> set[str]:
    return {canonical(re.split(r"[\[<>=!~; ]", item, maxsplit=1)[0]) for item in requirements}


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


@pytest.mark.parametrize("lock", LOCKS)
def test_every_package_of_a_lock_file_is_pinned_with_a_hash(lock: str) -> None:
    text = (ROOT / "requirements" / f"{lock}.txt").read_text()
    requirements = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 1)[1])
    entries = [entry for entry in requirements if entry.strip() and not entry.startswith("#")]
    assert len(entries) == len(pinned(lock)) > 10
    assert all("--hash=sha256:" in entry for entry in entries)
    assert "file://" not in text and "-e " not in text


def test_the_lock_files_hold_what_each_install_needs() -> None:
    runtime = requirement_names(project()["dependencies"])
    simulator = requirement_names(project()["optional-dependencies"]["simulator"])
    tools = requirement_names(project()["optional-dependencies"]["test"])
    production, demo, test = (set(pinned(lock)) for lock in LOCKS)
    assert runtime <= production and runtime | simulator <= demo and runtime | simulator | tools <= test
    assert not (simulator | TEST_TOOLS) & production, "the image carries no simulator and no test tools"
    assert not TEST_TOOLS & demo, "make demo installs no test tools"


def test_the_lock_files_agree_on_every_version_they_share() -> None:
    production, demo, test = (pinned(lock) for lock in LOCKS)
    assert {name: test[name] for name in production} == production
    assert {name: test[name] for name in demo} == demo


def test_make_and_the_image_install_only_from_the_lock_files() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "--require-hashes --no-deps" in makefile
    assert "-r requirements/demo.txt" in makefile and "-r requirements/test.txt" in makefile
    assert not re.search(r"pip install[^\n]*(-e |\s\.\s|\.\[)", makefile), "no unpinned install of the project"
