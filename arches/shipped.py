"""The specs, ablations and searches that ship with reslab, found by name: `reslab show resnet20`, `reslab run
resnet34`, `reslab ablate shortcuts` work from any folder, installed from a wheel or run from a checkout. A path
that exists always wins; `specs/resnet20.yaml` (as the README writes them) falls back to the shipped file too.

The wheel installs the checkout's specs/ folder as package data beside the arches package (pyproject.toml), so
both layouts keep it at the same place relative to this file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .errors import ReslabError, did_you_mean

SPECS = Path(__file__).resolve().parents[1] / "specs"     # the checkout's specs/, or site-packages/specs
FOLDERS = ("", "ablations", "searches")                   # where names are looked up, in this order
SUFFIXES = (".yaml", ".yml")


def shipped_names() -> list[str]:
    """Every shipped file's name (resnet20, shortcuts, ...), partial bases (_cifar) left out."""
    return sorted({p.stem for folder in FOLDERS for p in (SPECS / folder).glob("*.y*ml")
                   if p.suffix in SUFFIXES and not p.name.startswith("_")})


def shipped(ref: str) -> Optional[Path]:
    """The shipped file `ref` names: a bare name (resnet20), a file name (resnet20.yaml) or a path below specs/
    (specs/ablations/shortcuts.yaml, ablations/shortcuts); None when reslab ships no such file."""
    rel = Path(ref)
    if rel.is_absolute() or ".." in rel.parts:
        return None
    if rel.parts[:1] == ("specs",):
        rel = Path(*rel.parts[1:]) if len(rel.parts) > 1 else Path()
    names = [rel] if rel.suffix in SUFFIXES else [rel.with_name(rel.name + s) for s in SUFFIXES]
    folders = FOLDERS if len(rel.parts) == 1 else ("",)
    for folder in folders:
        for name in names:
            candidate = SPECS / folder / name
            if candidate.is_file():
                return candidate
    return None


def resolve_spec_file(ref: str) -> str:
    """`ref` when it is a file; else the shipped file it names; a bare name matching neither: one-line error with
    a 'did you mean' among the shipped names. Anything else is returned as given (its reader says what is wrong)."""
    if not ref or Path(ref).expanduser().exists():
        return ref
    found = shipped(ref)
    if found is not None:
        return str(found)
    if "/" not in ref and Path(ref).suffix not in SUFFIXES:
        raise ReslabError(f"no such file, nor a spec shipped with reslab{did_you_mean(ref, shipped_names())} "
                          f"(the shipped ones: {SPECS})", file=ref)
    return ref
