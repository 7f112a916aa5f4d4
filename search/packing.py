"""Packs in a study: a worker takes up to N waiting trials that train the same network and trains them as one
vmapped model (runs.pack), each still its own Optuna trial and its own MLflow child run (runs.pack_record).

    --pack auto|off|N    (or the study file's `pack:`; --pack wins)

`off` trains every trial alone. `N` lets a worker take up to N compatible trials at once. `auto` (the default) is
off on a CPU, where a pack trains slower than its members one after another (benchmarks/packs.py: 0.96x at P = 1
down to 0.36x at P = 16), and on a GPU sizes N from a memory probe: one training step of a pack of two, its peak
memory per member against the free memory (shared by the workers on the GPU), at most CAP.

Compatible: the trials' specs have the same runs.pack.fusible_key (the resolved spec minus seed, lr, decay,
schedule and the other fusible settings). Under the study lock the worker asks Optuna for the first waiting trial,
then claims the waiting trials with its key by the storage's public API (a WAITING trial set RUNNING, as
Study.ask pops one), leaving the others queued for other workers: no cell is lost or taken twice. A search packs
only when every sampled dimension is fusible (the worker asks N trials; TPE's constant liar keeps them apart);
otherwise its trials run alone, with one note. Arms of different widths (compute matching) are different networks
and never share a pack. Each member's trial gets its pack's id, size and its place in it (the report names the
packs), is pruned by its own trial's pruner each epoch, and is told its own outcome as it leaves the pack.
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
from typing import Any, Optional, Union

import optuna
import torch
from optuna.trial import TrialState

from arches import Spec
from arches.errors import ReslabError, first_line

from . import keys
from .plans import StudyDesign
from .trials import TrialRecord

CAP = 16                      # members of an `auto` pack at most
MEMORY_SHARE = 0.8            # of the free GPU memory an `auto` pack may plan for
CPU_NOTE = ("packs train slower than their members alone on a CPU (benchmarks/packs.py: 0.36-0.96x); every trial "
            "trains alone")
PackValue = Union[str, int]   # "auto" | "off" | N >= 1


def pack_value(value: Any) -> PackValue:
    """A --pack / `pack:` value normalised: 'auto', 'off' or a whole number >= 1 (YAML's off/false is 'off');
    ValueError with the one-line reason otherwise."""
    if isinstance(value, bool):
        return "auto" if value else "off"
    text = str(value).strip().lower()
    if text in ("auto", "off"):
        return text
    try:
        n = int(text)
    except ValueError:
        n = None
    if n is None or isinstance(value, float) or n < 1:
        raise ValueError("expected auto, off or a number of trials per pack >= 1")
    return n


def requested(plan: StudyDesign, opts: Any) -> tuple[PackValue, bool, ReslabError]:
    """(the pack asked for, whether it was asked explicitly, where: an error about it points there). --pack wins
    over the file's `pack:`; neither: auto, not explicit."""
    if getattr(opts, "pack", None) is not None:
        where = ReslabError("", file="--pack")
        raw = opts.pack
    elif plan.pack is not None:
        where = ReslabError("", file=str(plan.file), line=plan.pack_line, path="pack")
        raw = plan.pack
    else:
        return "auto", False, ReslabError("", file="--pack")
    try:
        return pack_value(raw), True, where
    except ValueError as e:
        where.message = f"{e} (got {raw!r})"
        raise where from None


def check(plan: StudyDesign, opts: Any, devices: int) -> None:
    """One-line errors before anything is recorded: a bad value, or packs of trials that train on several
    devices."""
    value, _, where = requested(plan, opts)
    if isinstance(value, int) and value > 1 and devices > 1:
        where.message = (f"packs train on one device, but every trial of this study takes {devices} "
                         f"(devices_per_trial); use --pack off or one device per trial")
        raise where


def sampled_blocker(plan: StudyDesign, threads: Optional[int] = None) -> Optional[str]:
    """A study whose trials are sampled: the first thing it varies whose values train different networks (not
    fusible: its sampled trials cannot share packs), else None. Fixed cells are grouped by their own keys."""
    if plan.fixed_cells() is not None:
        return None
    return next((name for name, specs in plan.variants(threads).items()
                 if len({spec_key(s) for s in specs}) > 1), None)


def spec_key(spec: Spec) -> Optional[str]:
    """The key specs share to pack together; None when the spec cannot be a pack member."""
    from runs.pack import fusible_key, unpackable

    return None if unpackable(spec) else fusible_key(spec)


def pack_size(plan: StudyDesign, opts: Any, threads: int, devices: int) -> tuple[int, list[str]]:
    """How many trials a worker packs (1: alone) and the notes that say why, once per worker."""
    from runs.pack import unpackable

    value, explicit, where = requested(plan, opts)
    flag = where.file if where.file == "--pack" else "pack"
    said = f"{flag} {value}" if explicit else "pack auto (the default)"
    if value == "off" or devices > 1:
        return 1, []
    spec = plan.build([], threads=threads)
    cuda = spec.train.accelerator in ("auto", "gpu") and torch.cuda.is_available()
    if value == "auto" and not cuda:
        return 1, [f"note: {said}: {CPU_NOTE}"] if explicit else []
    notes = []
    why = unpackable(spec)
    if why:
        return 1, [f"note: {said}: the trials cannot pack ({why}); every trial trains alone"]
    blocker = sampled_blocker(plan, threads)
    if blocker:
        return 1, [f"note: {said}: the search samples {blocker}, which changes the network (not fusible: "
                   f"runs.pack.FUSIBLE); every trial trains alone"]
    size = value if isinstance(value, int) else CAP
    if cuda:
        fits, probe_note = probe(spec, _sharing(opts))
        if fits < size:
            notes.append(f"note: {said}: {probe_note}; packs of at most {fits}")
        size = min(size, fits)
    cells = max(1, plan.trials_planned())
    if size > cells:
        if explicit and isinstance(value, int):
            notes.append(f"note: {said}: the study has {cells} trial{'s' if cells != 1 else ''}; packs of at "
                         f"most {cells}")
        size = cells
    notes += _unpackable_variants(plan, threads)
    return max(1, size), notes


def _sharing(opts: Any) -> int:
    """Workers that share one GPU (each worker sizes its packs for its share of the memory)."""
    gpus = max(1, torch.cuda.device_count())
    return max(1, math.ceil((getattr(opts, "workers", None) or 1) / gpus))


def _unpackable_variants(plan: StudyDesign, threads: int) -> list[str]:
    """One note for each thing the study varies whose trials cannot be pack members (they train alone)."""
    from runs.pack import unpackable

    notes = []
    for name, specs in plan.variants(threads).items():
        why = next(filter(None, map(unpackable, specs)), None)
        if why:
            notes.append(f"note: {name} cannot pack ({why}); its trials train alone")
    return notes


def probe(spec: Spec, sharing: int = 1) -> tuple[int, str]:
    """(members of `spec` that fit this GPU, how that was measured): one training step of a pack of two, its peak
    memory per member against MEMORY_SHARE of the free memory, split between `sharing` workers; at most CAP."""
    from runs.pack import Pack

    device = torch.device("cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    try:
        pack = Pack([spec, spec], device=device)
        pack.probe_step()
        torch.cuda.synchronize(device)
        per_member = max(1, (torch.cuda.max_memory_allocated(device) - before) // 2)
        del pack
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return 1, "a pack of 2 does not fit the GPU's memory"
    except ReslabError as e:                    # (runs.pack.PackError: e.g. max_steps stops mid-epoch)
        return 1, f"the trials cannot pack ({first_line(e)})"
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    fits = int(MEMORY_SHARE * free / sharing // per_member)
    how = (f"one step of a pack of 2 peaks at {per_member / 2**20:.0f} MiB per member, {free / 2**30:.1f} GiB "
           f"free" + (f" for {sharing} workers" if sharing > 1 else ""))
    return max(1, min(CAP, fits)), how


# ---- claiming (under the study lock) --------------------------------------------------------------------
_KEYS: dict[tuple, tuple[StudyDesign, Optional[str]]] = {}   # (the plan kept with its keys: its id stays its own)
_SAID: set[str] = set()          # notes this worker has printed once


def trial_key(plan: StudyDesign, params: Optional[dict], threads: int) -> Optional[str]:
    """The pack key of a trial given its queued values (None values: a fresh sampled trial of a search, whose
    dimensions all fuse: the base spec's key)."""
    cache = (id(plan), threads, json.dumps(params, sort_keys=True, default=str))
    if cache not in _KEYS:
        try:
            if params is None:
                spec = plan.build([], threads=threads)
            else:
                spec = plan.trial_spec(plan.start_trial(optuna.trial.FixedTrial(params)), threads=threads)
            _KEYS[cache] = plan, spec_key(spec)
        except Exception:  # noqa: BLE001  (values that make no network: it runs alone and says why)
            _KEYS[cache] = plan, None
    return _KEYS[cache][1]


def _queued(t: Any) -> Optional[dict]:
    return t.system_attrs.get(keys.QUEUED)


def claim_members(study: optuna.Study, storage: Any, plan: StudyDesign, first: optuna.Trial, size: int,
                  threads: int) -> Union[optuna.Trial, list]:
    """Under the study lock, `first` just asked: claim up to size - 1 more waiting trials with its pack key (and,
    in a search, ask new ones while the budget lasts). Returns `first` alone when nothing joined it."""
    from . import liveness
    from .study import search_used, trial_id_of

    study_id = storage.get_study_id_from_name(study.study_name)
    first_id = trial_id_of(storage, first)
    key = trial_key(plan, _queued(storage.get_trial(first_id)), threads)
    if key is None:
        return first
    members = [first]
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if len(members) >= size:
            break
        if _queued(t) is None or trial_key(plan, _queued(t), threads) != key:
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        try:
            if not storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        members.append(optuna.Trial(study, trial_id))
    if plan.fixed_cells() is None:
        with _quiet_optuna():
            while len(members) < size and plan.wants_sampled(search_used(plan, study.get_trials(deepcopy=False))):
                members.append(study.ask())
    for t in members[1:]:
        liveness.claim(t)
        storage.record_heartbeat(trial_id_of(storage, t))
    return members if len(members) > 1 or _retries_a_pack(study, first) else first


def _retries_a_pack(study: optuna.Study, trial: optuna.Trial) -> bool:
    """Whether `trial` retries a pack member (alone, it may still resume its pack: run_members)."""
    before = TrialRecord.of(trial).retry_of
    return before is not None and bool(TrialRecord.of(study.get_trials(deepcopy=False)[int(before)]).pack)


@contextlib.contextmanager
def _quiet_optuna():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ---- training a pack (outside the lock) -----------------------------------------------------------------
def interrupted_pack(ctx: Any, study: optuna.Study, members: list) -> Optional[tuple[str, list[int], dict[int, str]]]:
    """When `members` [(trial, begun)] retry exactly the members of one pack still training at its last checkpoint
    (its worker died): (that pack's id, each member's index in it, {index: its MLflow run}); else None (they train
    afresh as a new pack)."""
    from arches import spec_from_dict, spec_hash
    from runs.checkpoint import read_checkpoint
    from runs.pack_record import PACK_TAG, pack_file

    from . import recording

    previous, trials = {}, study.get_trials(deepcopy=False)
    for t, _ in members:
        before = TrialRecord.of(t).retry_of
        if before is None:
            return None
        previous[t.number] = TrialRecord.of(trials[int(before)])
    packs = {rec.pack for rec in previous.values()}
    if len(packs) != 1 or None in packs:
        return None
    pack_id = packs.pop()
    file = pack_file(ctx.output_dir, pack_id)
    if not file.exists():
        return None
    try:
        state = read_checkpoint(file)
    except Exception:  # noqa: BLE001  (unreadable: afresh)
        return None
    training = {int(m["index"]): spec_hash(spec_from_dict(m["spec"])) for m in state.get("members", [])}
    places = [int(previous[t.number].pack_index) for t, _ in members]
    if sorted(places) != sorted(training) or any(training[i] != spec_hash(b.spec) for i, (_, b) in
                                                 zip(places, members)):
        return None
    runs = {}
    by_trial = recording.trial_runs(ctx.client, ctx.experiment_id, ctx.parent_run_id)
    for i, (t, _) in zip(places, members):
        found = [r for r in by_trial.get(int(TrialRecord.of(t).retry_of), []) if r.data.tags.get(PACK_TAG) == pack_id]
        if not found or found[-1].info.status == "FINISHED":
            return None
        runs[i] = found[-1].info.run_id
    return pack_id, places, runs


def run_members(ctx: Any, study: optuna.Study, storage: Any, trials: list, heartbeat: int, prefix: str) -> int:
    """Train the claimed trials as one pack (runs.pack_record.train_pack), each told its own outcome as it leaves
    the pack. Returns the trials run. Raises ReslabError and KeyboardInterrupt (the unfinished trials FAIL first,
    and are retried)."""
    from runs.pack import PackError
    from runs.pack_record import PACK_SIZE_TAG, new_pack_id, train_pack

    from . import recording, views
    from .launch import placement
    from .objective import Outcome, PruningCallback, previous_run, begin, continue_run, judge, run_trial
    from .study import Heartbeat, outcome_line, stale_note, tell_outcome, trial_id_of

    plan = ctx.plan
    told: set[int] = set()

    def finish(trial: optuna.Trial, outcome: Outcome) -> None:
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            views.link_trial(trial, ctx.tracking_uri, ctx.experiment_id, outcome.run_id, str(ctx.output_dir))
        if tell_outcome(study, trial, outcome, ctx.client, 1):
            print(prefix + outcome_line(plan, trial, outcome), flush=True)
        else:
            print(prefix + stale_note(trial, storage), file=sys.stderr, flush=True)
        told.add(trial.number)

    with contextlib.ExitStack() as beats:
        for t in trials:
            beats.enter_context(Heartbeat(storage, trial_id_of(storage, t), heartbeat))
        members = []
        for t in trials:
            TrialRecord.put(t, **placement())
            begun = begin(ctx, t)
            if isinstance(begun, Outcome):
                finish(t, begun)
            else:
                members.append((t, begun))
        if not members:
            return len(trials)
        resumed = interrupted_pack(ctx, study, members)
        if resumed is not None:
            pack_id, places, runs = resumed
            members = [members[i] for i in sorted(range(len(members)), key=lambda i: places[i])]
            members = dict(zip(sorted(places), members))       # the old pack's member index -> (trial, begun)
            for index, (t, _) in members.items():
                continue_run(ctx, ctx.client.get_run(runs[index]), t.number)
        elif len(members) == 1:                 # a retry of a pack member that cannot resume its pack: alone
            t = members[0][0]
            print(f"{prefix}trial {t.number}{plan.cell_label(t)} started", flush=True)
            finish(t, run_trial(ctx, t))
            return len(trials)
        else:
            pack_id, runs = new_pack_id(), None
            members = dict(enumerate(members))
        size = int(ctx.client.get_run(runs[min(runs)]).data.tags.get(PACK_SIZE_TAG, len(members))) if resumed \
            else len(members)
        for i, (t, b) in members.items():
            TrialRecord.put(t, pack=pack_id, pack_size=size, pack_index=i)
            before = None if resumed else previous_run(ctx, t)   # a solo attempt's checkpoint: it starts afresh
            if before is not None:
                recording.mark_child(ctx.client, before.info.run_id, "FAILED", status="FAILED",
                                     reason=f"retried as trial {t.number} from scratch, in pack {pack_id}")
            how = "resumed" if resumed else "started"
            print(f"{prefix}trial {t.number}{plan.cell_label(t)} {how} in pack {pack_id} ({i + 1}/{size})",
                  flush=True)
        pruned: dict[int, str] = {}

        def prune(member: Any, row: dict) -> Optional[str]:
            why = PruningCallback(members[member.index][0], plan.prune_metric).verdict(member.history)
            if why:
                pruned[member.index] = why
            return why

        def on_result(index: int, result: Any) -> None:
            t, b = members[index]
            if index in pruned:
                recording.mark_child(ctx.client, result.run_id, "PRUNED", b.start.values)
                outcome = Outcome(TrialState.PRUNED, keys.PRUNED, reason=pruned[index], run_id=result.run_id)
            else:
                outcome = judge(ctx, result, b.start.values, b.cost)
            finish(t, outcome)

        try:
            listed = list(members.values())
            train_pack([b.spec for _, b in listed], tracking_uri=ctx.tracking_uri, output_dir=ctx.output_dir,
                       experiment=ctx.experiment, parent_run_id=ctx.parent_run_id,
                       tags=[b.start.tags for _, b in listed], params=[b.start.params for _, b in listed],
                       run_names=[b.start.run_name for _, b in listed],
                       prune=prune if plan.prune_metric is not None else None, pack_id=pack_id, on_result=on_result,
                       resume=runs)
        except PackError as e:                  # raised before any member trained or was recorded
            if not told and not resumed:
                if first_line(e) not in _SAID:
                    _SAID.add(first_line(e))
                    print(f"{prefix}note: these trials cannot train as one pack ({first_line(e)}); they train alone",
                          file=sys.stderr, flush=True)
                for t, _ in members.values():
                    TrialRecord.put(t, pack="", pack_size=1, pack_index=0)
                    finish(t, run_trial(ctx, t))
                return len(trials)
            raise
        except BaseException as e:
            stopped = isinstance(e, KeyboardInterrupt)
            reason = f"{type(e).__name__}: {first_line(e)}"
            for t, _ in members.values():
                if t.number in told:
                    continue
                with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                    TrialRecord.put(t, outcome=keys.INTERRUPTED if stopped else keys.ERROR, reason=reason)
                study.tell(t, state=TrialState.FAIL, skip_if_finished=True)
                if not stopped:
                    print(f"{prefix}trial {t.number} ERROR in pack {pack_id}: {reason}", flush=True)
            if stopped or isinstance(e, ReslabError) or not isinstance(e, Exception):
                raise
    return len(trials)
