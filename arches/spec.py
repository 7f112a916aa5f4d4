"""Load a spec: YAML (safe_load only) -> `base:` deep merge -> `--set` overrides -> validated `Spec`.

Every error names the file and line of the offending key, its dotted path and what was expected:
`specs/x.yaml:12: stages.2.depth: Input should be greater than or equal to 0`.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

import yaml
from pydantic import BaseModel, ValidationError

from .errors import SpecError, did_you_mean, first_line
from .schema import DATASETS, Spec

Override = Union[str, tuple[str, Any]]
KeyPath = tuple  # ('stages', 2, 'depth')


@dataclass
class Source:
    """Where each key of a loaded document came from, for error messages and provenance."""
    file: str                                   # the file asked for (display form)
    lines: dict[KeyPath, tuple[str, int]] = field(default_factory=dict)  # key path -> (file, line)
    chain: list[str] = field(default_factory=list)  # base files, outermost last
    base_data: dict | None = None               # the merged document of the base chain alone
    data: dict | None = None                    # the final document: bases, this file and --set merged
    overrides: list[tuple[str, Any]] = field(default_factory=list)  # --set pairs, in order

    def where(self, path: Sequence) -> tuple[str, int | None]:
        """File and line of the longest prefix of `path` that a document defined."""
        path = tuple(path)
        for n in range(len(path), 0, -1):
            if path[:n] in self.lines:
                return self.lines[path[:n]]
        return self.file, None


def display_path(path: Path) -> str:
    """path relative to the working directory when it lies below it (as error messages show files)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _record_lines(node: yaml.Node, prefix: KeyPath, file: str, out: dict) -> None:
    """Walk a composed YAML node tree, noting the line of every key and list item."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key: Any = key_node.value
            if isinstance(key, str) and key.lstrip("-").isdigit():
                key = int(key)
            out[prefix + (key,)] = (file, key_node.start_mark.line + 1)
            _record_lines(value_node, prefix + (key,), file, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[prefix + (i,)] = (file, item.start_mark.line + 1)
            _record_lines(item, prefix + (i,), file, out)


def read_yaml(path: Union[str, Path], lines: dict | None = None) -> dict:
    """Read one YAML mapping with yaml.safe_load, noting key lines into `lines`."""
    path = Path(path).expanduser()
    shown = display_path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError("no such file", file=shown) from None
    except OSError as e:
        raise SpecError(f"cannot read: {e.strerror}", file=shown) from None
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or first_line(e)
        raise SpecError(f"YAML syntax error: {problem}", file=shown,
                        line=mark.line + 1 if mark else None) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(f"expected a mapping of keys at the top, got {type(data).__name__}", file=shown, line=1)
    if lines is not None and node is not None:
        _record_lines(node, (), shown, lines)
    return data


def deep_merge(base: dict, over: dict) -> dict:
    """base updated by over: mappings merge key by key, everything else (lists too) is replaced."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def read_with_bases(path: Union[str, Path], source: Source, _seen: tuple = ()) -> dict:
    """A document with its `base:` chain merged in (the base first, this file over it)."""
    path = Path(path).expanduser()
    resolved = path.resolve()
    if resolved in _seen:
        raise SpecError("base: inheritance cycle: " + " -> ".join(display_path(p) for p in _seen + (resolved,)),
                        file=display_path(path))
    own_lines: dict = {}
    data = read_yaml(path, own_lines)
    base = data.pop("base", None)
    if base is None:
        source.lines.update(own_lines)
        return data
    if not isinstance(base, str):
        f, line = own_lines.get(("base",), (display_path(path), None))
        raise SpecError("expected a path to a spec file", file=f, line=line, path="base")
    base_path = (path.parent / base).expanduser()
    if not base_path.exists():
        f, line = own_lines.get(("base",), (display_path(path), None))
        raise SpecError(f"base spec not found: {base_path}", file=f, line=line, path="base")
    base_data = read_with_bases(base_path, source, _seen + (resolved,))
    source.chain.append(display_path(base_path))
    if source.base_data is None or not _seen:
        source.base_data = copy.deepcopy(base_data)
    source.lines.update(own_lines)
    return deep_merge(base_data, data)


def parse_override(item: Override) -> tuple[str, Any]:
    """'stages.2.depth=8' -> ('stages.2.depth', 8); the value is parsed as YAML."""
    if isinstance(item, tuple):
        return item
    if "=" not in item:
        raise SpecError(f"--set expects key.path=value, got '{item}'", file="--set")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def set_path(data: dict, dotted: str, value: Any) -> None:
    """Set data[a][b][2][c] = value for 'a.b.2.c', creating mappings where missing."""
    parts = dotted.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        here = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                raise SpecError(f"index '{part}' out of range: the list has {len(node)} items",
                                file="--set", path=here)
            idx = int(part)
            if last:
                node[idx] = value
            else:
                node = node[idx]
            continue
        if not isinstance(node, dict):
            raise SpecError(f"cannot set a key inside a {type(node).__name__}", file="--set", path=here)
        key: Any = int(part) if part.isdigit() and part not in node and int(part) in node else part
        if last:
            node[key] = value
        else:
            if not isinstance(node.get(key), (dict, list)):
                node[key] = {}
            node = node[key]


def _message(err: dict, model: type[BaseModel], loc: tuple) -> str:
    """pydantic's message, with 'did you mean' for unknown keys."""
    if err["type"] == "extra_forbidden":
        parent = _model_at(model, loc[:-1])
        fields = list(parent.model_fields) if parent else []
        return f"unknown key '{loc[-1]}'{did_you_mean(loc[-1], fields)}; expected one of: {', '.join(fields)}"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "literal_error":
        got = err.get("input")
        expected = err.get("ctx", {}).get("expected", "")
        choices = [c.strip().strip("'") for c in expected.replace(" or ", ",").split(",") if c.strip()]
        msg = f"got {got!r}; expected {expected}{did_you_mean(got, choices)}"
    elif err["type"] == "missing":
        msg = "required key is missing"
    elif "input" in err and not isinstance(err["input"], (dict, list)) and not msg.startswith("got "):
        msg = f"{msg} (got {err['input']!r})"
    return msg


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that describes the mapping at `loc`, if any."""
    import typing
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return None
        ann = current.model_fields[part].annotation
        for arg in (ann, *typing.get_args(ann)):
            inner = typing.get_args(arg) or (arg,)
            cls = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)
            if cls:
                current = cls
                break
        else:
            current = ann
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def validation_error(e: ValidationError, model: type[BaseModel], source: Source) -> SpecError:
    """The first pydantic error as one located SpecError."""
    err = e.errors()[0]
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
    file, line = source.where(loc)
    if err["type"] == "missing":   # point at the mapping that lacks the key (the file's top: line 1)
        file, line = source.where(loc[:-1]) if loc[:-1] else (source.file, 1)
    path = ".".join(str(p) for p in loc) or None
    return SpecError(_message(err, model, loc), file=file, line=line, path=path)


def build_document(path: Union[str, Path], overrides: Iterable[Override] = ()) -> tuple[dict, Source]:
    """The merged, overridden document of a spec file and where each key came from."""
    source = Source(file=display_path(Path(path)))
    data = read_with_bases(path, source)
    for item in overrides:
        key, value = parse_override(item)
        set_path(data, key, value)
        source.overrides.append((key, value))
        source.lines[tuple(int(p) if p.isdigit() else p for p in key.split("."))] = ("--set", None)
    source.data = copy.deepcopy(data)
    return data, source


def spec_from_dict(data: dict, source: Source | None = None) -> Spec:
    """Validate a document into a Spec, running the cross-field checks of arches.plan as well. A spec read from
    files (`source` given) also has its `init_from` file checked against the network; specs rebuilt from stored
    data (checkpoints, workers) are checked when their weights are loaded."""
    from .init import init_report
    from .plan import plan_network  # the plan needs the block registry; keep the import one-way

    from_files = source is not None
    source = source or Source(file="<dict>")
    try:
        spec = Spec.model_validate(data)
    except ValidationError as e:
        raise validation_error(e, Spec, source) from None
    spec._source = source
    check_recipe_and_data(spec)
    plan_network(spec)  # raises SpecError with a key path for impossible shapes
    if from_files:
        init_report(spec)   # a file that is not a state_dict, or another network's: SpecError (run ids: later)
    return spec


def check_recipe_and_data(spec: Spec) -> None:
    """Cross-field rules outside the network: the recipe has an end; a named data set fits `input`/`classes`."""
    source: Source = spec._source
    if spec.train.epochs is None and spec.train.max_steps is None:
        file, line = source.where(("train", "epochs"))
        raise SpecError("give train.epochs or train.max_steps (both are null)", file=file, line=line,
                        path="train.epochs")
    known = DATASETS.get(spec.data.name)
    if known and ((spec.input.channels, spec.input.size) != known[:2] or spec.classes != known[2]):
        channels, size, classes = known
        file, line = source.where(("data", "name"))
        raise SpecError(f"{spec.data.name} has {channels}x{size}x{size} images in {classes} classes, but the spec "
                        f"says input {spec.input.channels}x{spec.input.size}x{spec.input.size}, {spec.classes} "
                        f"classes (set input.channels={channels}, input.size={size}, classes={classes})",
                        file=file, line=line, path="data.name")


def load_spec(path: Union[str, Path], overrides: Iterable[Override] = ()) -> Spec:
    """Read, merge, override and validate a spec file. Raises SpecError (one line) on any problem."""
    data, source = build_document(path, overrides)
    return spec_from_dict(data, source)


def is_partial_base(path: Union[str, Path]) -> bool:
    """Files named _*.yaml are partial bases: only inherited from, not networks of their own."""
    return Path(path).name.startswith("_")


def check_partial_base(path: Union[str, Path]) -> Spec:
    """Validate a partial base's keys, types and cross-field rules, filling in a one-block stub network."""
    data, source = build_document(path)
    stem = data.get("stem")
    stem_width = stem.get("width", 64) if isinstance(stem, dict) else 64
    stub = {"name": Path(path).stem, "stages": [{"depth": 1, "width": stem_width}]}
    return spec_from_dict({**stub, **data}, source)


def spec_hash(spec: Spec) -> str:
    """Canonical hash of the resolved spec (key order and YAML formatting do not matter)."""
    text = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': [1, {'c': 2}]}} -> {'a.b.0': 1, 'a.b.1.c': 2}."""
    out: dict[str, Any] = {}
    if isinstance(data, dict) and data:
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(data, list) and data:
        for i, v in enumerate(data):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = data
    return out


def diff_from_base(spec: Spec) -> dict[str, tuple[Any, Any]]:
    """What a derived spec changes: dotted key -> (base value, value), comparing the documents as written
    (the base chain alone vs the base chain + this file + --set), so defaults neither file states never count."""
    source: Source | None = getattr(spec, "_source", None)
    if source is None or source.base_data is None or source.data is None:
        return {}
    mine, theirs = flatten(source.data), flatten(source.base_data)
    return {k: (theirs.get(k), mine.get(k)) for k in sorted(set(mine) | set(theirs))
            if theirs.get(k) != mine.get(k)}


def to_yaml(spec: Spec) -> str:
    """The resolved spec as YAML (what a run stores beside its results)."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
