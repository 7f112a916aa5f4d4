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
from typing import Any, Iterable, Union

import yaml
from pydantic import ValidationError

from .compile import init_report
from .errors import KeyPath, Locator, SpecError, first_line, index_of, located
from .plan import plan_network
from .registry import DATA_SETS
from .schema import Spec

Override = Union[str, tuple[str, Any]]


@dataclass
class Source(Locator):
    """Where each key of a loaded document came from (file, line: arches.errors.Locator), for error messages and
    provenance."""
    chain: list[str] = field(default_factory=list)  # base files, outermost last
    base_data: dict | None = None               # the merged document of the base chain alone
    data: dict | None = None                    # the final document: bases, this file and --set merged
    overrides: list[tuple[str, Any]] = field(default_factory=list)  # --set pairs, in order


def display_path(path: Path) -> str:
    """path relative to the working directory when it lies below it (as error messages show files)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


MAX_FILE_BYTES = 1_000_000     # a spec or study file: far more than any written by hand
MAX_NESTING = 64               # mappings and lists inside each other
MAX_NODES = 100_000            # values in the document with every alias expanded (a billion-laughs file has 10^9)


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses documents nested deeper than MAX_NESTING while it composes them (deep nesting
    would otherwise end in a RecursionError)."""

    def compose_node(self, parent, index):
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_NESTING:
                mark = self.peek_event().start_mark
                raise yaml.YAMLError(f"nested deeper than {MAX_NESTING} levels (line {mark.line + 1})")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _expanded_size(node: yaml.Node, memo: dict) -> int:
    """Values in the document under `node` with aliases expanded (each node counted once per use)."""
    if id(node) not in memo:
        memo[id(node)] = 0                  # (a node inside itself: counted as one)
        if isinstance(node, yaml.MappingNode):
            size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            size = 1 + sum(_expanded_size(v, memo) for v in node.value)
        else:
            size = 1
        memo[id(node)] = min(size, 10 * MAX_NODES)
    return memo[id(node)]


def _record_lines(node: yaml.Node, prefix: KeyPath, file: str, out: dict) -> None:
    """Walk a composed YAML node tree, noting the line of every key and list item."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key: Any = key_node.value
            if index_of(key) is not None:
                key = index_of(key)
            out[prefix + (key,)] = (file, key_node.start_mark.line + 1)
            _record_lines(value_node, prefix + (key,), file, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[prefix + (i,)] = (file, item.start_mark.line + 1)
            _record_lines(item, prefix + (i,), file, out)


def read_yaml(path: Union[str, Path], lines: dict | None = None) -> dict:
    """Read one YAML mapping (safe: plain data only), noting key lines into `lines`. Files that are not UTF-8 text,
    over MAX_FILE_BYTES, nested deeper than MAX_NESTING or expanding (through aliases) to more than MAX_NODES
    values are refused in one line."""
    path = Path(path).expanduser()
    shown = display_path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SpecError("no such file", file=shown) from None
    except IsADirectoryError:
        raise SpecError("is a folder, not a YAML file", file=shown) from None
    except OSError as e:
        raise SpecError(f"cannot read: {e.strerror}", file=shown) from None
    if len(raw) > MAX_FILE_BYTES:
        raise SpecError(f"{len(raw):,} bytes: too large for a spec or study file (at most {MAX_FILE_BYTES:,})",
                        file=shown)
    if b"\0" in raw:
        raise SpecError("a binary file, not YAML text", file=shown)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}); specs are UTF-8 YAML",
                        file=shown, line=raw[:e.start].count(b"\n") + 1) from None
    loader = None
    try:
        loader = _BoundedLoader(text)
        node = loader.get_single_node()
        if node is not None and _expanded_size(node, {}) > MAX_NODES:
            raise yaml.YAMLError(f"more than {MAX_NODES:,} values once its aliases are expanded")
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or first_line(e)
        raise SpecError(f"YAML syntax error: {problem}" if mark else f"refused: {problem}", file=shown,
                        line=mark.line + 1 if mark else None) from None
    finally:
        if loader is not None:
            loader.dispose()
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
            if index_of(part) is None or not -len(node) <= index_of(part) < len(node):
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
        key: Any = index_of(part) if index_of(part) is not None and part not in node and index_of(part) in node \
            else part
        if last:
            node[key] = value
        else:
            if not isinstance(node.get(key), (dict, list)):
                node[key] = {}
            node = node[key]


def build_document(path: Union[str, Path], overrides: Iterable[Override] = ()) -> tuple[dict, Source]:
    """The merged, overridden document of a spec file and where each key came from."""
    source = Source(file=display_path(Path(path)))
    data = read_with_bases(path, source)
    for item in overrides:
        key, value = parse_override(item)
        set_path(data, key, value)
        source.overrides.append((key, value))
        source.lines[tuple(p if index_of(p) is None else index_of(p) for p in key.split("."))] = ("--set", None)
    source.data = copy.deepcopy(data)
    return data, source


def spec_from_dict(data: dict, source: Source | None = None) -> Spec:
    """Validate a document into a Spec, running the cross-field checks of arches.plan as well. A spec read from
    files (`source` given) also has its `init_from` file checked against the network; specs rebuilt from stored
    data (checkpoints, workers) are checked when their weights are loaded."""
    from_files = source is not None
    source = source or Source(file="<dict>")
    try:
        spec = Spec.model_validate(data)
    except ValidationError as e:
        raise located(e, Spec, source, data) from None
    spec._source = source
    check_recipe_and_data(spec)
    plan = plan_network(spec)  # raises SpecError with a key path for impossible shapes
    if from_files:
        init_report(spec, plan=plan)   # a file that is not a state_dict, or another network's: SpecError (run ids: later)
    return spec


def check_recipe_and_data(spec: Spec) -> None:
    """Cross-field rules outside the network: the recipe has an end; a named data set fits `input`/`classes`."""
    source: Source = spec._source
    if spec.train.epochs is None and spec.train.max_steps is None:
        file, line = source.where(("train", "epochs"))
        raise SpecError("give train.epochs or train.max_steps (both are null)", file=file, line=line,
                        path="train.epochs")
    known = DATA_SETS.lookup(spec.data.name).shape
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
