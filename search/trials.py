"""What reslab keeps on each Optuna trial, typed: one record written by the worker, read by reports and retries.

    record = TrialRecord.of(frozen_trial)        # read (missing attributes are None / empty)
    TrialRecord.put(trial, outcome="complete", metrics={...}, run_id=...)   # write some fields
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

from . import keys

# field name -> Optuna user attribute
ATTRIBUTES = {"outcome": keys.OUTCOME, "reason": keys.REASON, "metrics": keys.METRICS, "run_id": keys.RUN_ID,
              "cost": keys.COST, "width_multiplier": keys.WIDTH_MULTIPLIER, "arm": keys.ARM, "seed": keys.SEED,
              "retry_of": keys.RETRY_OF, "attempt": keys.ATTEMPT, "threads": keys.THREADS, "device": keys.DEVICE,
              "job": keys.JOB, "host": keys.HOST, "pack": keys.PACK, "pack_size": keys.PACK_SIZE,
              "pack_index": keys.PACK_INDEX}
REASON_LIMIT = 2000          # characters of a reason kept on the trial


@dataclass
class TrialRecord:
    outcome: Optional[str] = None               # keys.COMPLETE ... keys.DISCARDED; None: the worker died
    reason: Optional[str] = None                # why it failed, was pruned or discarded
    metrics: dict[str, float] = field(default_factory=dict)   # final run metrics and costs
    run_id: Optional[str] = None                # its MLflow child run
    cost: dict[str, float] = field(default_factory=dict)      # params, macs (, latency_ms)
    width_multiplier: Optional[float] = None
    arm: Optional[str] = None                   # ablation cell
    seed: Optional[int] = None
    retry_of: Optional[int] = None              # the trial this one retries
    attempt: Optional[int] = None               # 1, 2, ... (None: a first attempt of a search trial)
    threads: Optional[int] = None               # CPU threads it ran with
    device: Optional[str] = None                # cpu, or the GPU's name
    job: Optional[str] = None                   # the cluster job that ran it last (SLURM: array id_task)
    host: Optional[str] = None                  # the machine that ran it last
    pack: Optional[str] = None                  # the pack it trained in (None: alone)
    pack_size: Optional[int] = None             # that pack's members
    pack_index: Optional[int] = None            # its place in the pack

    @classmethod
    def of(cls, trial: Any) -> "TrialRecord":
        """The record of a (frozen or live) trial."""
        attrs = trial.user_attrs
        values = {f.name: attrs[ATTRIBUTES[f.name]] for f in fields(cls) if ATTRIBUTES[f.name] in attrs}
        return cls(**values)

    @staticmethod
    def put(trial: Any, **values: Any) -> None:
        """Store some fields on a live trial (None values are skipped; reasons are cut to REASON_LIMIT)."""
        for name, value in values.items():
            if value is None:
                continue
            if name == "reason":
                value = str(value)[:REASON_LIMIT]
            trial.set_user_attr(ATTRIBUTES[name], value)

    @property
    def final(self) -> bool:
        """A result (complete, pruned, diverged, invalid): never run again."""
        return self.outcome in keys.FINAL_OUTCOMES

    @property
    def retryable_failure(self) -> bool:
        """A FAIL that is not a result: the worker died (no outcome) or the trial raised an error."""
        return self.outcome in (None, keys.ERROR)
