"""A study's workers as cluster jobs: one submitit job array (SLURM, or submitit's LocalExecutor) whose tasks each
join the study and pull trials until it is done, then the command returns (or, with --wait, follows them).

    python cli.py ablate FILE --launcher slurm --storage postgresql://... --tracking-uri http://...

Settings come from the study file's `launcher:` section, then --launcher-set KEY=VALUE and --workers, with
submitit's (and hydra-submitit-launcher's) names. A worker that gets submitit's signal (USR2, `signal_delay_s`
before its time limit or on preemption) stops its trial at the end of the current batch with a checkpoint; the trial
is left to be retried (resumed in the same MLflow run) and the worker requeues itself through submitit
(`checkpoint`, up to `max_num_timeout` time limits). A worker that dies outright is covered by the heartbeat.
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from arches.errors import ReslabError, did_you_mean, first_line

ROOT = Path(__file__).resolve().parents[1]
JOBS_ATTR = "reslab.jobs"                 # Optuna study attribute: the job arrays submitted for it


class LauncherSpec(BaseModel):
    """The `launcher:` section of a study file (submitit's and hydra-submitit-launcher's key names)."""
    model_config = ConfigDict(extra="forbid")

    workers: int = Field(2, ge=1, le=10_000)            # array tasks, each one worker pulling trials
    array_parallelism: int = Field(256, ge=1)           # tasks of the array running at once (sbatch --array=..%N)
    partition: Optional[str] = None                     # SLURM partition (default: the cluster's)
    timeout_min: int = Field(60, ge=1)                  # each task's time limit; requeued up to max_num_timeout
    gpus_per_node: Optional[int] = Field(None, ge=0)    # GPUs of each task (default: devices_per_trial on gpu specs)
    cpus_per_task: Optional[int] = Field(None, ge=1)    # CPU cores of each task (default: the trial's threads)
    mem_gb: Optional[float] = Field(None, gt=0)         # memory of each task
    setup: list[str] = []                               # shell lines run before the worker (module load, venv)
    signal_delay_s: int = Field(120, ge=0)              # USR2 this long before the time limit: stop and requeue
    max_num_timeout: int = Field(3, ge=0)               # requeues after a time limit (preemptions: unlimited)
    additional_parameters: dict[str, Any] = {}          # any other sbatch option: {account: lab, qos: high}
    folder: str = "outputs/submitit"                    # job scripts and logs (on a file system every node sees)


KEYS = tuple(LauncherSpec.model_fields)


@dataclass
class LaunchOptions:
    """How to submit a study's workers (cli: --launcher, --launcher-set, --wait, --dry-run)."""
    launcher: str                                       # slurm | local
    settings: list[str] = field(default_factory=list)   # KEY=VALUE over the file's `launcher:` section
    wait: bool = False                                  # follow the jobs with a progress bar until they end
    dry_run: bool = False                               # print the sbatch script; submit and record nothing


# ---- settings ---------------------------------------------------------------------------------------------
def launcher_settings(plan: Any, launch: LaunchOptions, workers: Optional[int]) -> LauncherSpec:
    """The file's `launcher:` section with --launcher-set and --workers over it; one-line errors."""
    import yaml

    values = dict(plan.launcher or {})
    for item in launch.settings:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ReslabError(f"expected KEY=VALUE, got '{item}'", file="--launcher-set")
        if key not in KEYS:
            raise ReslabError(f"unknown key '{key}'{did_you_mean(key, KEYS)}; expected one of: {', '.join(KEYS)}",
                              file="--launcher-set")
        values[key] = yaml.safe_load(text) if text.strip() else None
    if workers is not None:
        values["workers"] = workers
    try:
        return LauncherSpec.model_validate(values)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        flag = "--workers" if key == "workers" and workers is not None else "--launcher-set"
        raise ReslabError(f"{key}: {err['msg']} (got {err.get('input')!r})", file=flag) from None


def check_flags(launch: Optional[LaunchOptions], wants_json: bool) -> None:
    """Flags that only make sense together (one line, before anything is read)."""
    if launch is None:
        return
    if launch.dry_run and launch.wait:
        raise ReslabError("--dry-run submits nothing, so there is nothing to --wait for; give one of them",
                          file="--dry-run")
    if launch.dry_run and launch.launcher != "slurm":
        raise ReslabError("--dry-run prints the sbatch script of --launcher slurm", file="--dry-run")
    if wants_json and not (launch.wait or launch.launcher == "local"):
        raise ReslabError("--json prints the final report, which only --wait sees", file="--json")


def check_stores(storage: str, tracking_uri: str) -> None:
    """Every node must reach both stores: a database server for Optuna, an MLflow tracking server for runs."""
    fix = "(README: Several machines)"
    scheme = storage.split("://", 1)[0].split("+", 1)[0].lower()
    if scheme in ("sqlite", "") or "://" not in storage:
        raise ReslabError(f"the workers run on other machines and cannot share {storage}: give a database server "
                          f"every node reaches, e.g. --storage postgresql://USER@HOST:5432/optuna {fix}",
                          file="--storage")
    if tracking_uri.split("://", 1)[0].lower() not in ("http", "https"):
        raise ReslabError(f"the workers run on other machines and cannot share {tracking_uri} and its local artifact "
                          f"folder: start `mlflow server --serve-artifacts` and give --tracking-uri http://HOST:5000 "
                          f"{fix}", file="--tracking-uri")


# ---- executors --------------------------------------------------------------------------------------------
def _slurm_ready() -> None:
    missing = [c for c in ("sbatch", "srun", "squeue", "scontrol") if shutil.which(c) is None]
    if missing:
        raise ReslabError(f"no SLURM on this machine: {', '.join(missing)} not on PATH; run this on the cluster's "
                          f"login node, or try the workers here with --launcher local", file="--launcher")


def _local_ready() -> None:
    return None


READY: dict[str, Callable[[], None]] = {"slurm": _slurm_ready, "local": _local_ready}   # launcher -> its check


def job_parameters(spec: LauncherSpec, plan: Any, devices: int, threads: int) -> dict[str, Any]:
    """submitit.AutoExecutor parameters for one worker task."""
    gpus = spec.gpus_per_node
    if gpus is None and (plan.document.get("train") or {}).get("accelerator") == "gpu":
        gpus = devices
    params: dict[str, Any] = {
        "name": f"reslab-{plan.name}", "timeout_min": spec.timeout_min,
        "cpus_per_task": spec.cpus_per_task or max(1, threads * devices),
        "slurm_array_parallelism": spec.array_parallelism, "slurm_signal_delay_s": spec.signal_delay_s,
        "slurm_setup": [f"export PYTHONPATH={shlex.quote(str(ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}",
                        "export PYTHONWARNINGS=ignore", *spec.setup]}
    if gpus:
        params["gpus_per_node"] = gpus
    if spec.mem_gb is not None:
        params["mem_gb"] = spec.mem_gb
    if spec.partition:
        params["slurm_partition"] = spec.partition
    if spec.additional_parameters:
        params["slurm_additional_parameters"] = dict(spec.additional_parameters)
    return params


def make_executor(name: str, folder: Path, spec: LauncherSpec, params: dict[str, Any]) -> Any:
    """A submitit.AutoExecutor for `name` (slurm | local) with the worker's parameters."""
    import submitit

    executor = submitit.AutoExecutor(folder=folder, cluster=name, slurm_max_num_timeout=spec.max_num_timeout)
    executor.update_parameters(**params)
    return executor


def sbatch_script(executor: Any, workers: int) -> str:
    """The sbatch script submitit writes for an array of `workers` tasks (its own renderer, as it submits it)."""
    import submitit

    slurm = executor._executor
    array = submitit.SlurmExecutor(slurm.folder, slurm.max_num_timeout)
    array.update_parameters(**slurm.parameters)
    array.parameters["map_count"] = workers                 # (what submitit sets for a job array)
    return array._make_submission_file_text(slurm._submitit_command_str, "dry-run")


def check_request(script: str) -> None:
    """`sbatch --test-only`: SLURM checks the request (partition, GPUs, limits) and submits nothing."""
    with tempfile.NamedTemporaryFile("w", suffix=".sh", delete=False) as f:
        f.write(script)
    try:
        out = subprocess.run(["sbatch", "--test-only", f.name], capture_output=True, text=True, timeout=120)
    finally:
        os.unlink(f.name)
    if out.returncode != 0:
        lines = [ln.strip() for ln in out.stderr.splitlines() if ln.strip()]
        errors = [ln for ln in lines if "error" in ln.lower()] or lines or [f"exit code {out.returncode}"]
        message = errors[-1].replace("sbatch: error: ", "")
        raise ReslabError(f"SLURM refuses the request: {message}; nothing was submitted (change it in the study "
                          f"file's `launcher:` or with --launcher-set)", file="--launcher")


# ---- the worker of a job ----------------------------------------------------------------------------------
def placement() -> dict[str, str]:
    """Where this worker runs: its SLURM job (array id_task) when it is one, and its host."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")
    return {"host": socket.gethostname(), **({"job": job} if job else {})}


class StudyWorker:
    """One task of the job array: join the study and run trials until it is done. submitit's signal (USR2) stops
    the running trial at the end of its batch with a checkpoint (runs.callbacks.InterruptGuard), or, between
    trials, lets no new one start; then submitit requeues the task (`checkpoint`)."""

    def __init__(self, options: dict, index: int):
        self.options, self.index = options, index
        self.opts: Any = None
        self.preempted = False

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """What submitit resubmits after a preemption or time limit: this worker again, from a clean state."""
        import submitit

        return submitit.helpers.DelayedSubmission(StudyWorker(self.options, self.index))

    def _between_trials(self, signum: int, frame: Any) -> None:
        """USR2 outside a trial's training: start no new trial (the worker loop stops at its deadline)."""
        self.preempted = True
        self.opts.deadline = 0.0

    def __call__(self) -> int:
        from runs.fit import Interrupted

        from .objective import follow_trial, following
        from .study import StudyOptions
        from .worker import work

        trial = following()
        if trial is not None:                               # a DDP rank > 0 that Lightning started again: its
            signal.signal(signal.SIGUSR2, signal.SIG_IGN)   # rank 0 alone requeues (in training: InterruptGuard)
            return follow_trial(trial)
        requeue = signal.getsignal(signal.SIGUSR2)          # submitit's checkpoint-and-requeue handler
        os.environ["SLURM_JOB_NAME"] = "interactive"         # Lightning's switch: its DDP ranks are not SLURM tasks
        self.opts = StudyOptions(**self.options)
        signal.signal(signal.SIGUSR2, self._between_trials)
        where = placement()
        print(f"worker {self.index}: job {where.get('job', '-')} on {where['host']}", flush=True)
        ran = 0
        try:
            ran = work(self.opts, self.index, finalize_when_done=True)
        except Interrupted as e:
            if e.signal_name != "SIGUSR2":
                raise
            self.preempted = True
        if self.preempted:
            print(f"worker {self.index}: stopped by SIGUSR2 (its trial, if any, is retried); requeued", flush=True)
            if callable(requeue):
                requeue(signal.SIGUSR2, None)                # checkpoint(), scontrol requeue, exit
        return ran


# ---- submitting -------------------------------------------------------------------------------------------
@dataclass
class Submitted:
    """What a launch submitted: the array's job id and its tasks."""
    array: str
    jobs: list[str]
    folder: str


def launch_study(opts: Any, launch: LaunchOptions) -> Optional[Any]:
    """Check everything, create/join the study, submit its workers as one job array; print how to follow them.
    Returns the final report when it waits for the workers, else None. SLURM checks the request before any store
    is opened (a dry run opens none)."""
    from .storage import shown
    from .study import load_plan, open_study, prepare, requested_devices, trial_threads

    READY[launch.launcher]()
    opts = opts.resolved()
    if launch.launcher == "slurm":
        check_stores(opts.storage, opts.tracking_uri)
    plan = load_plan(opts)
    spec = launcher_settings(plan, launch, opts.workers)
    folder = Path(spec.folder).expanduser()
    folder = folder if folder.is_absolute() else Path.cwd() / folder

    def executor_for(devices: int) -> Any:
        executor = make_executor(launch.launcher, folder, spec, job_parameters(spec, plan, devices,
                                                                               trial_threads(plan)))
        if launch.launcher == "slurm":
            script = sbatch_script(executor, spec.workers)
            if launch.dry_run:
                print(script)
                return None
            check_request(script)
        return executor

    asked = requested_devices(plan, opts)[0] or 1
    executor = executor_for(asked)
    if executor is None:
        return None
    opened = open_study(opts, check_here=False, plan=plan)   # (the GPUs are the nodes', not this machine's)
    if opened.devices != asked:                               # (the stored study's)
        executor = executor_for(opened.devices)
    prepared = prepare(plan, opts, opened.storage, opened.devices, opened.where, opened.client)
    options = {**asdict(opts), "workers": spec.workers, "progress": False}
    try:
        with executor.batch():
            jobs = [executor.submit(StudyWorker(options, i)) for i in range(spec.workers)]
    except Exception as e:  # noqa: BLE001  (submitit's FailedJobError: sbatch's own words)
        raise ReslabError(f"submitting the workers failed: {first_line(e)}", file="--launcher") from None
    submitted = Submitted(jobs[0].job_id.split("_")[0], [j.job_id for j in jobs], str(folder))
    if launch.launcher == "slurm":
        record_jobs(opts.storage, plan.name, submitted.array)
        where = f"as job {submitted.array} ({', '.join(submitted.jobs)})"
    else:
        where = f"as processes {', '.join(submitted.jobs)}"
    print(f"study '{plan.name}': {spec.workers} workers submitted to {launch.launcher} {where}; parent run "
          f"{prepared.parent_run_id}", flush=True)
    follow = f"python cli.py status {plan.name} --storage {shown(opts.storage)}"
    if launch.launcher == "slurm":
        print(f"follow: {follow}   (squeue -j {submitted.array}; logs in {folder})", flush=True)
    if not (launch.wait or launch.launcher == "local"):
        return None
    return wait_for(plan, opts, jobs, submitted.array if launch.launcher == "slurm" else None)


def record_jobs(storage_url: str, name: str, array: str) -> None:
    """Add the job array to the study's attribute JOBS_ATTR (`status` shows their SLURM states)."""
    import optuna

    from .storage import open_storage, study_lock

    storage = open_storage(storage_url)
    with study_lock(storage, name):
        study = optuna.load_study(study_name=name, storage=storage)
        study.set_user_attr(JOBS_ATTR, [*study.user_attrs.get(JOBS_ATTR, []), array])


def wait_for(plan: Any, opts: Any, jobs: list, array: Optional[str]) -> Any:
    """A progress bar of finished cells (trials) until every job has ended (SLURM: as squeue sees the array, which
    needs no accounting database); then the study's report."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .report import study_report
    from .status import ACTIVE, QueueUnreadable, slurm_jobs, study_status

    unread = [0]                                     # squeue queries in a row that got no answer

    def ended() -> bool:
        if array is None:
            return all(j.done() for j in jobs)
        try:
            states = slurm_jobs([array])
        except QueueUnreadable:
            unread[0] += 1                           # unknown is not ended: wait, for 5 minutes of silence at most
            if unread[0] * 5 >= 300:
                raise
            return False
        unread[0] = 0
        return not any(j["state"] in ACTIVE for j in states)

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        task = bar.add_task(plan.name, total=None)
        while True:
            status = study_status(plan.name, opts.storage, jobs_state=False)
            bar.update(task, total=status.total, completed=status.counts["done"],
                       description=f"{plan.name}: {status.line()}")
            if ended():
                break
            time.sleep(5)
    left = [r.name for r in study_status(plan.name, opts.storage, jobs_state=False).rows if r.state != "done"]
    if left:
        print(f"note: the jobs ended with {len(left)} cells not done ({', '.join(left[:5])}); run the same command "
              f"again to submit workers for them", file=sys.stderr)
    return study_report(plan.name, storage=opts.storage, tracking_uri=opts.tracking_uri)
