"""Every command in the fenced shell blocks of README.md and docs/*.md is exercised: novic's own
commands are parsed by their real CLI (subcommand and every option must exist and take the value
given; nothing runs), the offline-safe ones among them are run, `pip install` lines must name extras
that pyproject.toml defines (and the wheel of its version), scripts and modules must exist. A
command this test cannot check is on SKIPPED, with the reason; .ci/run runs the README's two
commands and the wheel install for real."""
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import typer

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS = set(PYPROJECT["project"]["optional-dependencies"])
WHEEL = f"dist/novic-{PYPROJECT['project']['version']}-py3-none-any.whl"

# First words that are not novic's and need no check beyond existing, with the reason.
SKIPPED = {
    "printf": "shell builtin writing an example file",
    ".": "activates the venv that .ci/run makes",
    "nice": "wraps a benchmark script (minutes); the script's existence is checked",
    "curl": "talks to a running server; tests/test_ray_serve.py and tests/test_serve_example.py send "
            "the same requests",
    "tritonserver": "the server of an NGC Triton container; tests/test_triton.py loads the exported "
                    "repository in PyTriton's bundled tritonserver",
}
# Commands run for real here: offline, seconds.
RUN = {("novic-train", "config"), ("novic-import", "models")}


def shell_blocks(path: Path):
    """(line number, text) of each ```bash/```sh block."""
    text = path.read_text()
    for m in re.finditer(r"^```(bash|sh|shell)\n(.*?)^```", text, re.S | re.M):
        yield text[:m.start()].count("\n") + 2, m.group(2)


def commands(block: str):
    """Shell command words of a block: continuations joined, comments dropped, && and | split,
    a redirection and what follows it dropped."""
    joined = re.sub(r"\\\n", " ", block)
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        cmd = []
        for w in words + ["&&"]:
            if w in ("&&", "|", ";"):
                if cmd:
                    yield cmd
                cmd = []
            elif w.startswith(">") or (cmd and cmd[-1] in (">", ">>")):
                cmd.append(">")
            else:
                cmd.append(w)


def all_commands():
    for path in DOCS:
        for line, block in shell_blocks(path):
            for cmd in commands(block):
                yield pytest.param([w for w in cmd if w != ">"][:cmd.index(">") if ">" in cmd else None],
                                   id=f"{path.name}:{line}:{' '.join(cmd)[:50]}")


def novic_command(prog: str, args: list[str]):
    """The click command of a console script and the arguments it parses."""
    from novic.cli import bench, eval, export, importer, label, run, serve, train
    if prog == "novic-import":
        sub = {"models": importer.models_app, "fetch": importer.fetch_app}.get(args[0] if args else "")
        return (typer.main.get_command(sub), args[1:]) if sub else (typer.main.get_command(importer.app), args)
    app = {"novic-train": train.app, "novic-export": export.app, "novic-run": run.app,
           "novic-bench": bench.app, "novic-eval": eval.app, "novic-serve": serve.app,
           "novic-label": label.app}[prog]
    return typer.main.get_command(app), args


def check_novic(prog: str, args: list[str]):
    import click
    command, rest = novic_command(prog, args)
    if isinstance(command, click.Group):
        assert rest and rest[0] in command.commands, f"{prog}: no subcommand {rest[:1]}"
        command, rest = command.commands[rest[0]], rest[1:]
    command.make_context(prog, list(rest))   # raises on an unknown option or a bad value


def check_pip(args: list[str]):
    assert args[0] in ("install", "wheel"), args   # .ci/run builds the wheel and installs it
    for spec in args[1:]:
        if spec.startswith("-") and spec != "-e":
            continue
        m = re.fullmatch(r"(\.|dist/[^\[]+)\[([a-z,]+)\]", spec)
        # novic is not on PyPI: 'novic[cpu]' alone would fail; extras go on '.' or the wheel's path
        assert m or "[" not in spec, f"{spec}: install from a clone ('.[...]') or the wheel"
        if m:
            assert set(m.group(2).split(",")) <= EXTRAS, f"unknown extra in {spec}"
            assert m.group(1) in (".", WHEEL), f"{spec}: the wheel of version {WHEEL}"


def run_console_script(prog: str, args: list[str], cwd: Path):
    module = {"novic-import": "importer"}.get(prog, prog[len("novic-"):])
    code = f"import sys; sys.argv[0] = {prog!r}; from novic.cli.{module} import main; main()"
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd,
                         timeout=120, env={**os.environ, "NOVIC_CACHE": str(cwd / "cache")})
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("cmd", list(all_commands()))
def test_documented_command(cmd, tmp_path):
    head, args = cmd[0], cmd[1:]
    if head in SKIPPED:
        if head == "nice":
            assert (ROOT / args[-1]).is_file() or (ROOT / args[args.index("python") + 1]).is_file()
        return
    if head.startswith("novic-"):
        check_novic(head, args)
        if (head, args[0] if args else "") in RUN:
            run_console_script(head, args, tmp_path)
    elif head == "pip":
        check_pip(args)
    elif head == "bash":
        script = ROOT / args[0]
        assert script.is_file(), args
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    elif head == "python":
        if args[:2] == ["-m", "pytest"]:
            return   # the suite itself
        assert (ROOT / args[0]).is_file(), args
    elif head == "torchrun":
        i = args.index("-m")
        assert args[i + 1] == "novic.cli.train", args
        check_novic("novic-train", args[i + 2:])
    else:
        pytest.fail(f"{head}: a documented command this test does not know; check it here or add it to SKIPPED")


def test_the_docs_have_commands():
    """The extraction finds the README's set-up commands (a broken regex would check nothing)."""
    found = [" ".join(c.values[0]) for c in all_commands()]
    assert "bash examples/quickstart.sh" in found
    assert any(c.startswith("novic-export onnx --checkpoint ta4.safetensors --pretrained") for c in found)
    assert len(found) > 20


def test_docs_and_docstrings_cite_only_files_in_the_repository():
    """README, docs/ and the code point readers at docs/*.md pages that exist, and at no document
    outside the repository."""
    internal = ("REFERENCE.md", "DESIGN.md")
    files = [*DOCS, *sorted((ROOT / "novic").rglob("*.py")), *sorted((ROOT / "examples").iterdir())]
    for path in files:
        text = path.read_text(errors="replace")
        assert not any(name in text for name in internal), f"{path} cites a document users do not have"
        for page in re.findall(r"docs/([\w-]+\.md)", text):
            assert (ROOT / "docs" / page).is_file(), f"{path} cites docs/{page}, which does not exist"
