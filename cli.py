#!/usr/bin/env python3
"""reslab's command line: parsing and error printing only; every command calls one library function.

    python cli.py show specs/resnet34.yaml          # table of stages: blocks, output shape, params, MACs
    python cli.py validate specs/*.yaml             # exit 0 when every spec is valid
    python cli.py run specs/x.yaml --set train.epochs=3

Any bad input (spec, flag, data, storage) prints one line, `file:line: key.path: message`, and exits 2.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import sys

EXIT_BAD_INPUT = 2


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line with a 'did you mean', exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        hint = ""
        words = []
        if "unrecognized arguments:" in message:
            words = message.split("unrecognized arguments:", 1)[1].split()
        elif "invalid choice:" in message:
            words = [message.split("invalid choice:", 1)[1].split("'")[1]]
        if words:
            options = [o for a in self._actions for o in a.option_strings]
            choices = [c for a in self._actions if isinstance(a, argparse._SubParsersAction) for c in a.choices]
            for w in words:
                close = difflib.get_close_matches(w, options + choices, n=1, cutoff=0.6)
                if close and close[0] != w:
                    hint = f" (did you mean '{close[0]}'?)"
                    break
        print(f"{self.prog}: error: {message}{hint}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def add_spec_args(p: argparse.ArgumentParser, many: bool = False) -> None:
    p.add_argument("spec", nargs="+" if many else None, help="spec YAML file" + ("s" if many else ""))
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override spec values by dotted path, values parsed as YAML (stages.2.depth=8)")


# ---- commands --------------------------------------------------------------------------------------------
def cmd_show(args) -> int:
    from arches import complexity, load_spec
    from arches.report import complexity_table

    spec = load_spec(args.spec, args.overrides)
    cost = complexity(spec)
    if args.json:
        print(json.dumps(cost.to_dict(), indent=2))
    else:
        complexity_table(cost)
    return 0


def cmd_validate(args) -> int:
    from arches import load_spec

    for path in args.spec:
        spec = load_spec(path, args.overrides)
        print(f"ok  {path}  ({spec.name})")
    return 0


def build_parser() -> Parser:
    parser = Parser(prog="reslab", description="A declarative lab for residual-family networks.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("show", help="print a spec's stages, output shapes, params and MACs")
    add_spec_args(p)
    p.add_argument("--json", action="store_true", help="print the complexity as JSON")
    p.set_defaults(handler=cmd_show)

    p = sub.add_parser("validate", help="check spec files; exit 0 when all are valid")
    add_spec_args(p, many=True)
    p.set_defaults(handler=cmd_validate)

    # (each command: one parser block here, one cmd_ function above)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from arches.errors import ReslabError

    try:
        return args.handler(args) or 0
    except ReslabError as e:
        print(str(e), file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
