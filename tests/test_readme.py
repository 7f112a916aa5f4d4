"""Every `python cli.py` / `reslab` command in README.md's bash blocks still works: its flags parse, and every spec or
study file it names validates with its --set values; `show` and `validate` commands run whole. (The commands that
train, serve or need a run id are not run here: .ci/run runs the README's main job, other tests train.)"""
from __future__ import annotations

import re
import shlex

import pytest

from cli import build_parser, main
from conftest import ROOT

PLACEHOLDERS = re.compile(r"\b(RUN_ID|HOST|SERVER|NAME|R)\b")
FILE_COMMANDS = ("show", "validate", "run", "ablate", "search", "diagnose")


def braces(word: str) -> list[str]:
    """bash brace expansion of one word: specs/plain{20,32}.yaml -> specs/plain20.yaml specs/plain32.yaml."""
    m = re.search(r"\{([^{}]*,[^{}]*)\}", word)
    if not m:
        return [word]
    return [w for part in m.group(1).split(",") for w in braces(word[:m.start()] + part + word[m.end():])]


def readme_commands() -> list[list[str]]:
    """The argument lists of every reslab command in the README's bash blocks (after `cli.py` or `reslab`)."""
    text = (ROOT / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                for i, w in enumerate(words):
                    if w == "cli.py" or w.endswith("/cli.py") or (w == "reslab" and i == 0):
                        out.append([x for word in words[i + 1:] for x in braces(word)])
                        break
    return out


COMMANDS = readme_commands()


def test_the_readme_has_its_commands():
    assert len(COMMANDS) > 20 and ["run", "specs/fmnist_resnet20.yaml"] in COMMANDS


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(c)[:70] for c in COMMANDS])
def test_a_readme_command_works(argv, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = build_parser().parse_args(argv)                    # flags as written (argparse exits 2 otherwise)
    if args.command not in FILE_COMMANDS:
        return
    files = args.spec if args.command in ("show", "validate", "run", "diagnose") else args.file
    files = [files] if isinstance(files, str) else list(files or [])
    sets = [o for o in args.overrides if not PLACEHOLDERS.search(o) and not o.startswith("init_from=")]
    if args.command in ("show", "validate") and not PLACEHOLDERS.search(" ".join(argv)) and \
            not any(o.startswith("init_from=") for o in args.overrides):
        assert main(argv) == 0, capsys.readouterr().err
    elif files:
        assert main(["validate", *files, *(["--set", *sets] if sets else [])]) == 0, capsys.readouterr().err
