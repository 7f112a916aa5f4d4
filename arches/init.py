"""Weights in (`init_from`): read a state_dict file and load it into a compiled network, key by key.

Files are torch.save'd state_dicts (read with `torch.load(..., weights_only=True)`: no pickled code) or
.safetensors. Accepted as they come: torchvision and timm files; checkpoints that wrap the state_dict
(`{"state_dict": ...}`, `{"model": ...}`: Lightning, reslab's own runs, the common CIFAR-ResNet code); keys with a
`module.` (DataParallel), `model.` (Lightning) or `_orig_mod.` (torch.compile) prefix; `linear` heads and
`shortcut` projections (the common CIFAR ResNets); then the spec's `init_map` (regex -> replacement).
Everything is checked on the meta device before a tensor is built; a mismatch is one line naming the key with
its expected and found shapes. An MLflow run id is turned into its checkpoint by the caller (`resolve`:
runs.checkpoint), since arches knows nothing of MLflow.
"""
from __future__ import annotations

import json
import math
import pickle
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .errors import Locator, SpecError, first_line
from .schema import Spec

Resolve = Callable[[str], Path]       # MLflow run id -> its checkpoint file
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
WRAPPERS = ("state_dict", "model_state_dict", "model", "net", "network")   # where checkpoints keep the tensors
PREFIXES = ("module.", "model.", "_orig_mod.")
ALIASES = ((r"^linear\.", "fc."), (r"\.shortcut\.", ".downsample."))        # the common CIFAR ResNets' names
OPTIONAL = ("num_batches_tracked",)   # BN counters: files written before PyTorch 0.4.1 lack them
SAFETENSORS_HEADER_LIMIT = 100 << 20   # bytes of JSON header read at most (the format's own limit: 100 MB)
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


class NotAStateDict(Exception):
    """The file holds no state_dict (the message says what it holds)."""


@dataclass
class InitReport:
    """What `init_from` loads into a network: every key of the network in exactly one of the first three lists."""
    source: str                       # the file read
    strict: bool
    loaded: list[str] = field(default_factory=list)       # network keys that take the file's tensor
    mismatched: list[tuple[str, list, list]] = field(default_factory=list)  # (key, expected, found shape)
    missing: list[str] = field(default_factory=list)      # network keys the file lacks (they keep their init)
    unexpected: list[str] = field(default_factory=list)   # file keys (after renaming) the network lacks
    renamed: dict[str, str] = field(default_factory=dict)  # network key -> the file's key, where they differ
    rules: dict[str, int] = field(default_factory=dict)    # renaming applied -> how many of the file's keys it changed

    def problem(self) -> Optional[str]:
        """Why this file cannot initialise the network, or None."""
        if not self.loaded:
            return "no tensor of the file fits this network (another network's checkpoint?)"
        hint = "; another network's checkpoint?" if len(self.loaded) < len(self.mismatched) + len(self.missing) else ""
        if not self.strict:
            return None
        counts = f"{len(self.mismatched)} shapes differ, {len(self.missing)} keys missing, " \
                 f"{len(self.unexpected)} unexpected{hint}; init_strict: false loads only what fits"
        if self.mismatched:
            key, expected, found = self.mismatched[0]
            return f"{key}: expected shape {expected}, found {found} ({counts})"
        if self.missing:
            return f"{self.missing[0]}: not in the file ({counts})"
        if self.unexpected:
            return f"{self.unexpected[0]}: in the file but not in this network ({counts})"
        return None

    def to_dict(self) -> dict:
        return asdict(self)


def is_run_id(ref: str) -> bool:
    return bool(RUN_ID.match(ref)) and not Path(ref).exists()


def read_safetensors(path: Path, meta: bool = False) -> dict[str, torch.Tensor]:
    """A .safetensors file's tensors (8-byte header length, JSON header, raw little-endian data), every entry
    checked against the file first: a truncated or forged file is NotAStateDict, never a reshape error."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if size < 8 or length > min(size - 8, SAFETENSORS_HEADER_LIMIT):
            raise NotAStateDict(f"not a safetensors file (its header says {length} bytes, the file has {size})")
        try:
            header = json.loads(f.read(length))
        except (ValueError, MemoryError, OverflowError):
            raise NotAStateDict("not a safetensors file (no JSON header)") from None
        if not isinstance(header, dict):
            raise NotAStateDict("not a safetensors file (its header is not a JSON object)")
        entries = {name: safetensors_entry(name, info, size - 8 - length)
                   for name, info in header.items() if name != "__metadata__"}
        data = b"" if meta else f.read()
    out = {}
    for name, (dtype, shape, start, end) in entries.items():
        if meta or start == end:
            out[name] = torch.empty(shape, dtype=dtype, device="meta" if meta else "cpu")
        else:
            out[name] = torch.frombuffer(bytearray(data[start:end]), dtype=dtype).reshape(shape)
    return out


def safetensors_entry(name: str, info: Any, data_size: int) -> tuple[torch.dtype, list[int], int, int]:
    """(dtype, shape, start, end) of one header entry, checked: a known dtype, a shape, offsets inside the file's
    `data_size` bytes of data that hold exactly that many elements."""
    bad = f"tensor '{name}'"
    if not isinstance(info, dict) or not isinstance(info.get("dtype"), str) or info["dtype"] not in SAFETENSORS_DTYPES:
        dtype = info.get("dtype") if isinstance(info, dict) else None
        raise NotAStateDict(f"{bad} has dtype {dtype!r}; reslab reads {', '.join(SAFETENSORS_DTYPES)}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and len(shape) <= 64 and all(type(d) is int and d >= 0 for d in shape)):
        raise NotAStateDict(f"{bad} has no valid shape (got {shape!r})")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise NotAStateDict(f"{bad} has no valid data_offsets (got {offsets!r})")
    dtype, (start, end) = SAFETENSORS_DTYPES[info["dtype"]], offsets
    if end > data_size:
        raise NotAStateDict(f"truncated: {bad} ends at byte {end} of the data, the file holds {data_size}")
    expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if end - start != expected:
        raise NotAStateDict(f"{bad} has shape {shape} ({info['dtype']}), which needs {expected} bytes; its offsets "
                            f"give {end - start}")
    return dtype, shape, start, end


def read_state_dict(path: Path, meta: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, unwrapped from a checkpoint dict; NotAStateDict if there are none."""
    if path.suffix == ".safetensors":
        return read_safetensors(path, meta)
    with open(path, "rb") as f:
        magic = f.read(4)
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):      # torch.save's zip, or a legacy pickle
        raise NotAStateDict("not a file torch.save writes (nor .safetensors)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")        # (pickle protocol notes: the error below says what matters)
            obj = torch.load(str(path), map_location="meta" if meta else "cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (a pickle of code, a corrupt zip, ...)
        raise NotAStateDict(refusal(e)) from None
    candidates = ([obj.get(k) for k in WRAPPERS] if isinstance(obj, dict) else []) + [obj]
    tensors = [{k: v for k, v in c.items() if isinstance(v, torch.Tensor)} for c in candidates if isinstance(c, dict)]
    for state in sorted(tensors, key=lambda t: -len(t)):    # the wrapper (or the file) holding the most tensors
        if state:
            return state
    what = f"a dict of {', '.join(map(str, list(obj)[:5]))}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
    raise NotAStateDict(f"it holds {what}, no tensors")


def refusal(e: BaseException) -> str:
    """Why torch.load(weights_only=True) did not load a file, in one line: what it pickles when it pickles code,
    never PyTorch's advice to load it again with the check off (reslab runs no pickled code)."""
    text, first = str(e), first_line(e)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return (f"it pickles a {found.group(1)}, which weights_only=True does not load (reslab runs no pickled "
                f"code; save the model's state_dict() instead)")
    why = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if why or isinstance(e, pickle.UnpicklingError) or "weights_only" in first:
        detail = f" ({why.group(1).strip()})" if why else ""
        return f"it holds pickled Python objects{detail}; reslab loads only tensors and plain data (weights_only=True)"
    return f"torch.load(weights_only=True) cannot read it: {first or type(e).__name__}"


def rename(keys: list[str], name_map: dict[str, str], rules: Optional[dict] = None) -> dict[str, str]:
    """file key -> network key: known prefixes dropped (keys without them ignored), aliases, then name_map.
    `rules` (if given) collects how many keys each renaming changed."""
    names, rules = {k: k for k in keys}, rules if rules is not None else {}
    for prefix in PREFIXES:
        if any(n.startswith(prefix) for n in names.values()):
            names = {k: n[len(prefix):] for k, n in names.items() if n.startswith(prefix)}
            rules[f"prefix {prefix} dropped"] = len(names)
    for pattern, replacement in (*ALIASES, *name_map.items()):
        renamed = {k: re.sub(pattern, replacement, n) for k, n in names.items()}
        changed = sum(renamed[k] != names[k] for k in names)
        if changed:
            rules[f"{pattern} -> {replacement}"] = changed
        names = renamed
    return names


def match(theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor], name_map: dict[str, str],
          source: str, strict: bool) -> InitReport:
    """Pair the file's tensors with the network's keys by name and shape."""
    report = InitReport(source, strict)
    by_name = {new: old for old, new in rename(list(theirs), name_map, report.rules).items()}
    for key, tensor in ours.items():
        old = by_name.get(key)
        if old is None:
            if not key.endswith(OPTIONAL):
                report.missing.append(key)
        elif list(theirs[old].shape) != list(tensor.shape):
            report.mismatched.append((key, list(tensor.shape), list(theirs[old].shape)))
        else:
            report.loaded.append(key)
            if old != key:
                report.renamed[key] = old
    report.unexpected = [k for k in by_name if k not in ours]
    return report


def _fail(spec: Spec, message: str) -> SpecError:
    return (getattr(spec, "_source", None) or Locator("<dict>")).error(message, "init_from")


def init_path(spec: Spec, resolve: Optional[Resolve] = None) -> Optional[Path]:
    """The file `init_from` names: a path, or a run id's checkpoint (by `resolve`); None for a run id without one."""
    ref = str(spec.init_from)
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    if is_run_id(ref):
        return resolve(ref) if resolve is not None else None
    if path.is_dir():
        raise _fail(spec, f"{ref} is a folder, not a weights file")
    if path.exists():
        raise _fail(spec, f"{ref} is not a regular file (a device, a pipe?), not a weights file")
    raise _fail(spec, f"no such file '{ref}' (nor an MLflow run id: 32 hex digits)")


def _read(spec: Spec, path: Path, meta: bool) -> dict[str, torch.Tensor]:
    try:
        return read_state_dict(path, meta=meta)
    except NotAStateDict as e:
        raise _fail(spec, f"{path} is not a state_dict: {e}") from None
    except OSError as e:                     # unreadable (permissions, a file gone meanwhile, an I/O error)
        raise _fail(spec, f"cannot read {path}: {e.strerror or first_line(e)}") from None


def checked(spec: Spec, path: Path, theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> InitReport:
    """The file's tensors against the network's state_dict `ours`; SpecError on a misfit."""
    report = match(theirs, ours, spec.init_map, str(path), spec.init_strict)
    problem = report.problem()
    if problem:
        raise _fail(spec, f"{path} does not fit this network: {problem}")
    return report


def read_init(spec: Spec, resolve: Optional[Resolve] = None, meta: bool = True) -> Optional[tuple[Path, dict]]:
    """(the file `init_from` names, its tensors: shapes only on the meta device); None when the spec has no
    init_from, or names a run id and no `resolve` is given."""
    path = init_path(spec, resolve) if spec.init_from else None
    return (path, _read(spec, path, meta=meta)) if path is not None else None


def load_init(model: torch.nn.Module, spec: Spec, resolve: Optional[Resolve] = None) -> Optional[InitReport]:
    """Copy the `init_from` tensors that fit into `model` (checked first: SpecError if they do not)."""
    if not spec.init_from:
        return None
    found = read_init(spec, resolve, meta=False)
    if found is None:
        raise _fail(spec, f"'{spec.init_from}' is an MLflow run id: `python cli.py run` resolves it (runs.checkpoint)")
    path, theirs = found
    report = checked(spec, path, theirs, model.state_dict())
    with torch.no_grad():
        model.load_state_dict({k: theirs[report.renamed.get(k, k)] for k in report.loaded}, strict=False)
    return report
