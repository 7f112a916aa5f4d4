"""The two kinds of study file, by the section that names them: how a message speaks of one and which command runs it.

A leaf module (no imports), so the command line can point at the right command without loading a study.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StudyKind:
    """One kind of study file."""
    name: str                                # the file's section and the stored reslab.kind: ablation | search
    command: str                             # the cli.py command that runs it

    @property
    def a_file(self) -> str:
        """'an ablation file', 'a search file'."""
        return f"{'an' if self.name[0] in 'aeiou' else 'a'} {self.name} file"


STUDY_KINDS = {k.name: k for k in (StudyKind("ablation", "ablate"), StudyKind("search", "search"))}
KIND_OF_COMMAND = {k.command: k.name for k in STUDY_KINDS.values()}   # cli.py command -> the kind it expects
