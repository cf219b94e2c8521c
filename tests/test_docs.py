"""The README and the docs stay true: every setting, command and error code is there."""

from __future__ import annotations

from pathlib import Path

import pytest

from producer.cli import main
from shared.schemas import ErrorCode
from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def env_name(field: str) -> str:
    alias = Settings.model_fields[field].validation_alias
    choices = getattr(alias, "choices", None)
    return str(choices[0]) if choices else f"IMGQ_{field.upper()}"


@pytest.mark.parametrize("field", sorted(Settings.model_fields))
def test_every_setting_is_in_the_readme(field: str) -> None:
    assert f"`{env_name(field)}`" in README


@pytest.mark.parametrize("command", sorted(main.commands))
def test_every_command_is_in_the_readme(command: str) -> None:
    assert f"imgq {command}" in README


@pytest.mark.parametrize("code", [c.value for c in ErrorCode])
def test_every_error_code_is_documented(code: str) -> None:
    assert f"| `{code}` |" in (ROOT / "docs" / "errors.md").read_text(encoding="utf-8")


def test_readme_opens_with_the_two_commands() -> None:
    block = README.split("```sh", 1)[1].split("```", 1)[0].strip().splitlines()
    assert block[0].startswith("make run IMAGES=./photos")
    assert block[1].startswith("make test")
    assert "make test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_readme_lists_every_image_extension_folders_pick_up() -> None:
    from shared.image_formats import IMAGE_EXTENSIONS

    listed = README.split("Folders and globs pick up the", 1)[1].split("(`shared/", 1)[0]
    assert set(" ".join(listed.split()).split("`")[1].split()) == IMAGE_EXTENSIONS


def test_readme_exit_codes_are_the_cli_exit_codes() -> None:
    from producer import cli_common

    table = README.split("The exit codes of\nevery command:\n\n", 1)[1].split("\n\n", 1)[0]
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")]
    codes = sorted(v for k, v in vars(cli_common).items() if k.startswith("EXIT_"))
    assert [int(c) for c in rows if c.isdigit()] == [0, *codes]


PLACEHOLDERS = {"job_id": "<job>", "tid": "<task>", "name": "<name>", "worker_id": "<worker>"}


def imgq_keys() -> dict[str, str]:
    """Every key ``shared.keys`` names, with placeholders for its variable parts."""
    import inspect

    from shared import keys

    found: dict[str, str] = {}
    for attr, value in vars(keys).items():
        if attr.startswith("_") or getattr(value, "__module__", keys.__name__) != keys.__name__:
            continue
        if inspect.isfunction(value):
            params = list(inspect.signature(value).parameters)
            key = value(*(PLACEHOLDERS[p] for p in params))
            if isinstance(key, str):
                found[attr] = key
        elif isinstance(value, str) and value.startswith(keys.PREFIX) and not value.endswith(":"):
            found[attr] = value
    return found


def test_the_key_inventory_names_every_imgq_key() -> None:
    """docs/operations.md's table of Redis keys lists each key shared/keys.py builds
    (a key of a family by its last part, as in "`imgq:task:<task>:attempts`, `:inflight`")."""
    rows = [
        line
        for line in (ROOT / "docs" / "operations.md").read_text(encoding="utf-8").splitlines()
        if line.startswith("| `")
    ]
    keys = imgq_keys()
    assert len(keys) >= 25 and "job_done" in keys and "HELD" in keys
    missing = []
    for attr, key in sorted(keys.items()):
        base, _, last = key.rpartition(":")
        if not any(f"`{key}`" in row or (base in row and f"`:{last}`" in row) for row in rows):
            missing.append(f"{attr} ({key})")
    assert not missing, f"not in the key inventory of docs/operations.md: {missing}"
