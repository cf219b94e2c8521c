"""The package layout holds: shared/ only what both sides import, image input in the workers."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(package: str) -> dict[str, set[str]]:
    """Every module each file of a package imports (top level or inside functions)."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
        found[str(path.relative_to(ROOT))] = names
    return found


def under(name: str, package: str) -> bool:
    """True when the dotted name is the package or one of its modules."""
    return name == package or name.startswith(f"{package}.")


def test_shared_imports_neither_producer_nor_workers() -> None:
    files = imported_modules("shared")
    assert "shared/settings.py" in files
    wrong = {
        path: sorted(n for n in names if under(n, "producer") or under(n, "workers"))
        for path, names in files.items()
    }
    assert {path: names for path, names in wrong.items() if names} == {}


def test_only_the_workers_import_tensorflow() -> None:
    users = {
        path
        for package in ("shared", "producer")
        for path, names in imported_modules(package).items()
        if any(under(n, "tensorflow") or under(n, "tensorflow_hub") for n in names)
    }
    assert users == set()
    assert any("tensorflow" in names for names in imported_modules("workers").values())


def test_image_input_is_imported_by_the_workers_alone() -> None:
    users = {
        path
        for package in ("shared", "producer", "workers")
        for path, names in imported_modules(package).items()
        if any(under(n, "workers.inputs") for n in names) and not path.startswith("workers/inputs/")
    }
    assert "workers/runtime.py" in users
    assert sorted(path for path in users if not path.startswith("workers/")) == []
    assert not (ROOT / "shared" / "images.py").exists()


def test_image_input_loads_without_tensorflow() -> None:
    # Decode threads and tools that only read images must not pay for TensorFlow.
    code = (
        "import sys, workers.inputs; "
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported'; "
        "print(sorted(workers.inputs.__all__))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(
        ["ImageError", "ReadLimits", "decode_image", "load_image", "read_source"]
    )


def test_producer_modules_import_no_private_names_of_each_other() -> None:
    # The command line's shared pieces live in producer/cli_common.py; no module
    # reaches for another's private helpers (which made import circles).
    private: dict[str, list[str]] = {}
    for package in ("producer", "tests"):
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            for node in ast.walk(tree):
                if (
                    isinstance(node, ast.ImportFrom)
                    and node.module
                    and under(node.module, "producer")
                ):
                    names = [a.name for a in node.names if a.name.startswith("_")]
                    if names:
                        private.setdefault(str(path.relative_to(ROOT)), []).extend(names)
    assert private == {}
    cli_imports = imported_modules("producer")
    for module in ("producer/workers_cmd.py", "producer/jobctl_cli.py", "producer/cli_common.py"):
        assert "producer.cli" not in cli_imports[module], module


def test_results_store_is_a_package_one_module_per_store() -> None:
    import shared.results_store as store
    from shared.results_store import base, postgres, redis_store

    assert Path(store.__file__).name == "__init__.py"
    assert store.ResultsStore is base.ResultsStore
    assert store.RedisResultsStore is redis_store.RedisResultsStore
    assert store.PostgresResultsStore is postgres.PostgresResultsStore
    # Every name importers take from the package path is still there.
    for name in store.__all__:
        assert hasattr(store, name), name
    # The stores share the interface only: neither imports the other.
    assert (
        "shared.results_store.postgres"
        not in imported_modules("shared")["shared/results_store/redis_store.py"]
    )
    assert (
        "shared.results_store.redis_store"
        not in imported_modules("shared")["shared/results_store/postgres.py"]
    )


def test_the_producer_package_imports_its_api_on_first_use() -> None:
    code = (
        "import sys\n"
        "import producer\n"
        "assert 'producer.api' not in sys.modules and 'celery' not in sys.modules\n"
        "import producer.api\n"
        "assert producer.Client is producer.api.Client\n"
        "assert 'JobError' in dir(producer)\n"
        "try:\n"
        "    producer.Nothing\n"
        "except AttributeError as exc:\n"
        "    print(exc)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "module 'producer' has no attribute 'Nothing'"


def test_the_imgq_command_freezes_what_its_imports_built_and_runs_with_the_collector_on() -> None:
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]["scripts"]
    assert scripts["imgq"] == "producer.entry:main"
    code = (
        "import gc, sys\n"
        "from producer import entry\n"
        "assert 'producer.cli' not in sys.modules\n"
        "sys.argv = ['imgq', '--version']\n"
        "try:\n"
        "    entry.main()\n"
        "except SystemExit as exc:\n"
        "    assert exc.code in (0, None), exc.code\n"
        "print(gc.isenabled(), gc.get_freeze_count())\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert run.returncode == 0, run.stderr
    version, state = run.stdout.strip().splitlines()
    assert version.startswith("imgq, version ")
    enabled, frozen = state.split()
    assert enabled == "True"
    assert int(frozen) > 50_000  # click, celery, redis, pydantic and imgq's modules
