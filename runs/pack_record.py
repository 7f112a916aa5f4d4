"""A pack's MLflow records: each member its own run, as runs.fit records a solo run, plus tags naming its pack.

    results = train_pack(specs, tracking_uri=uri, output_dir=out, parent_run_id=parent)   # one RunResult each

Each member's run is opened, ended and given its curves, checkpoint artifact and MLflow model by runs.record.RunRecord
(the code a solo run uses): the same params, tags, data set inputs and per-epoch metrics, plus `reslab.pack` (the
pack's id), `reslab.pack_size` and `reslab.pack_index`. Every epoch each member's last.ckpt (the solo layout, written
atomically under <output_dir>/checkpoints/<run id>/) and the pack's own checkpoint (<output_dir>/packs/<id>.ckpt)
are rewritten. A member that failed ends FAILED with its reason (tag failure_reason), a pruned one KILLED with
state PRUNED, as a solo run would.
"""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from arches import Spec, build_model, complexity

from .callbacks import Pruned
from .checkpoint import write_atomically
from .mlflow_client import default_tracking_uri, with_driver
from .mlflow_write import log_datasets, log_metrics
from .module import NonFiniteLoss
from .options import RunOptions
from .pack import Member, Pack
from .record import RunRecord, RunResult

PACK_TAG = "reslab.pack"                 # on each member's run: its pack's id ...
PACK_SIZE_TAG = "reslab.pack_size"       # ... the members it started with ...
PACK_INDEX_TAG = "reslab.pack_index"     # ... and the member's place in it
PACK_TAGS = (PACK_TAG, PACK_SIZE_TAG, PACK_INDEX_TAG)


def new_pack_id() -> str:
    return uuid.uuid4().hex[:12]


def pack_file(output_dir: Union[str, Path], pack_id: str) -> Path:
    """Where pack `pack_id` keeps its own checkpoint (rewritten every epoch): <output_dir>/packs/<id>.ckpt."""
    return Path(output_dir) / "packs" / f"{pack_id}.ckpt"


class MemberView:
    """What RunRecord follows for a member (a ReslabModule's history, results and network)."""

    def __init__(self, member: Member):
        self.member = member
        self.model: Optional[torch.nn.Module] = None      # the trained network, once the member left

    @property
    def history(self) -> list[dict]:
        return self.member.history

    @property
    def results(self) -> dict:
        test = {k: v for k, v in self.member.metrics.items() if k.startswith("test/")}
        return {"test": test} if test else {}

    def left(self) -> None:
        """Build the member's network from its final weights (the record logs it as the MLflow model)."""
        net = build_model(self.member.spec)
        net.load_state_dict(self.member.weights)
        self.model = net.eval()


def _ending(member: Member) -> Optional[BaseException]:
    """The exception a solo run would have ended with (runs.record.ENDINGS), None when it finished."""
    if member.status == "FAILED":
        return NonFiniteLoss(member.reason or "training loss became non-finite")
    if member.status == "PRUNED":
        return Pruned(member.reason or "pruned")
    return None


def train_pack(specs: Sequence[Spec], *, tracking_uri: Optional[str] = None,
               output_dir: Union[str, Path] = "outputs", experiment: Optional[str] = None,
               parent_run_id: Optional[str] = None, tags: Optional[Sequence[dict]] = None,
               params: Optional[Sequence[dict]] = None, run_names: Optional[Sequence[str]] = None,
               prune: Optional[Callable[[Member, dict], Optional[str]]] = None,
               device: Optional[torch.device] = None, pack_id: Optional[str] = None,
               on_result: Optional[Callable[[int, RunResult], None]] = None,
               resume: Optional[dict[int, str]] = None) -> list[RunResult]:
    """Train `specs` as one pack, each recorded as its own MLflow run (see the module docstring); `tags`, `params`
    and `run_names`: per member, as runs.fit.train takes them; `pack_id`: the pack's id (default: a new one);
    `on_result(index, result)`: as each member's run ends (at the epoch it leaves). `resume`: {member index: its
    run} of pack `pack_id` interrupted, which goes on from its checkpoint (its members still training, exactly as if
    never stopped), in the same runs; `specs` are then those members' specs, in index order. Returns each member's
    RunResult, in order."""
    output_dir = Path(output_dir).expanduser().resolve()
    uri = with_driver(tracking_uri or default_tracking_uri(output_dir))
    pack_id = pack_id or new_pack_id()
    pack_path = pack_file(output_dir, pack_id)
    pack = Pack.load(pack_path, device=device) if resume else Pack(specs, device=device)
    records, views, finals = {}, {}, {}
    for i, m in enumerate(pack.members):
        extra = {**((tags or [{}] * len(specs))[i]), PACK_TAG: pack_id, PACK_INDEX_TAG: m.index}
        if not resume:                      # (a resumed pack's runs keep the size the pack started with)
            extra[PACK_SIZE_TAG] = len(specs)
        options = RunOptions(tracking_uri=uri, output_dir=output_dir, experiment=experiment,
                             run_name=(run_names or [None] * len(specs))[i], parent_run_id=parent_run_id, tags=extra,
                             params=(params or [None] * len(specs))[i], resume=resume[m.index] if resume else None)
        view = MemberView(m)
        record = RunRecord(m.spec, complexity(m.spec), options, module=view, data=m.data)
        record.__enter__()
        finals[m.index] = record.checkpoint
        if not resume:
            log_datasets(record.client, record.run_id, m.data.dataset_inputs())
        records[m.index], views[m.index] = record, view

    def on_epoch(p: Pack, left: list[Member]) -> None:
        for m in [*p.members, *left]:
            record = records[m.index]
            row = m.history[-1]
            log_metrics(record.client, record.run_id, row, step=int(row["epoch"]))
            checkpoint = p.member_checkpoint(m.index)
            write_atomically(finals[m.index], lambda tmp: torch.save(checkpoint, tmp))
        p.save(pack_path)
        for m in left:
            record, view = records[m.index], views[m.index]
            if view.results:
                log_metrics(record.client, record.run_id, view.results["test"],
                            step=int(m.history[-1]["epoch"]))
            view.left()
            exc = _ending(m)
            record.__exit__(type(exc) if exc else None, exc, None)
            if on_result is not None:
                on_result(m.index, record.result)

    try:
        pack.fit(prune=prune, on_epoch=on_epoch)
    except BaseException as e:
        for record in records.values():
            if not record.ended:
                record.__exit__(type(e), e, None)
        raise
    return [record.result for record in records.values()]
