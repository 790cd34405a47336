"""The rules of the house (docs/ARCHITECTURE.md), checked on the source itself.

Small modules, no import cycles, a light producer side that never imports the worker at
import time, one source for the final states (Python and Lua agree), a broker layer whose
kombu/Celery internals exist, and a CLI whose every option says what it does and its default.
"""

from __future__ import annotations

import ast
from pathlib import Path

import click
import pytest
from conftest import ROOT

from pipeq.core.contract import FINAL_STATES
from pipeq.core.store import FINISH_SCRIPT, START_SCRIPT
from pipeq.ops.cli import cli
from pipeq.worker.broker.compat import missing_internals

#: Longest module allowed (lines), everywhere in the repository.
MAX_LINES = 400
SOURCE_DIRS = ("producer", "worker", "tests", "benchmarks", "examples")
#: Where each installed package lives (pyproject.toml's package-dir mapping).
PACKAGE_DIRS = {"pipeq": ROOT / "producer", "pipeq.worker": ROOT / "worker"}


def python_files() -> list[Path]:
    return sorted(p for d in SOURCE_DIRS for p in (ROOT / d).rglob("*.py"))


def module_name(path: Path) -> str:
    """The installed name of a source file of producer/ or worker/."""
    for package, folder in sorted(PACKAGE_DIRS.items(), key=lambda kv: -len(kv[0])):
        if path.is_relative_to(folder):
            parts = path.relative_to(folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            return ".".join((package, *parts))
    raise ValueError(path)


def top_level_imports(path: Path) -> set[str]:
    """Modules a file imports when it is imported (not inside functions or TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for child in ([node] if not isinstance(node, ast.Try) else node.body):
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.add(child.module)
                found.update(f"{child.module}.{alias.name}" for alias in child.names)
    return found


def pipeq_graph() -> dict[str, set[str]]:
    files = [p for folder in PACKAGE_DIRS.values() for p in folder.rglob("*.py")]
    modules = {module_name(p): p for p in files}
    return {name: {m for m in top_level_imports(path) if m in modules and m != name}
            for name, path in modules.items()}


def test_no_module_is_longer_than_the_limit() -> None:
    long = {str(p.relative_to(ROOT)): n for p in python_files()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"split these modules (over {MAX_LINES} lines)"


def test_modules_import_each_other_without_cycles() -> None:
    graph = pipeq_graph()
    visiting: list[str] = []
    done: set[str] = set()

    def visit(name: str) -> None:
        if name in done:
            return
        assert name not in visiting, f"import cycle: {' -> '.join([*visiting, name])}"
        visiting.append(name)
        for other in sorted(graph[name]):
            visit(other)
        visiting.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def test_the_light_side_never_imports_the_worker_at_import_time() -> None:
    graph = pipeq_graph()
    offenders = {name: sorted(m for m in deps if m.startswith("pipeq.worker"))
                 for name, deps in graph.items() if not name.startswith("pipeq.worker")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_lua_scripts_know_the_same_final_states_as_python() -> None:
    expected = {state.value for state in FINAL_STATES}
    for script in (START_SCRIPT, FINISH_SCRIPT):
        line = next(ln for ln in script.splitlines() if ln.startswith("local final = "))
        named = {part.split("=")[0].strip() for part in line.split("{")[1].split("}")[0]
                 .split(",")}
        assert named == expected


def test_the_broker_layer_finds_every_internal_it_overrides() -> None:
    assert missing_internals() == []


def _commands(group: click.Group, prefix: str = "pipeq") -> list[tuple[str, click.Command]]:
    found: list[tuple[str, click.Command]] = [(prefix, group)]
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            found += _commands(command, f"{prefix} {name}")
        else:
            found.append((f"{prefix} {name}", command))
    return found


@pytest.mark.parametrize(("name", "command"), _commands(cli), ids=lambda v: str(v))
def test_every_cli_option_says_what_it_does_and_its_default(name: str,
                                                             command: click.Command) -> None:
    assert command.help, f"`{name}` has no help text"
    for param in command.params:
        if not isinstance(param, click.Option) or param.hidden or param.name in (
                "help", "version"):
            continue
        shown = f"`{name} {param.opts[0]}`"
        assert param.help, f"{shown} has no help text"
        if (param.is_flag and param.default in (None, False)) or param.default.__class__.__name__ \
                == "Sentinel":
            continue  # a flag is off unless given: its help says what it turns on
        says_default = param.show_default or param.required or any(
            word in param.help.lower() for word in ("default", "required"))
        assert says_default, f"{shown}: its help does not say its default"
    text = command.get_help(click.Context(command, info_name=name))
    assert "``" not in text and ":class:" not in text, f"reST markup in `{name} --help`"
