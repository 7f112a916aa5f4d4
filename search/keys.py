"""The names a study is stored under: Optuna study and trial attributes, and the MLflow tags of its runs.

A leaf module (no imports): every other module of search/ reads and writes records through these names, so a
stored study and its MLflow records are spelled the same everywhere.
"""

# ---- Optuna study attributes (set once, when the study is created) ----
FINGERPRINT = "reslab.fingerprint"      # hash of everything that decides the trials (a changed file refuses)
META = "reslab.meta"                    # what a report needs without the file: arms, seeds, metrics, views
PARENT = "reslab.parent_run_id"         # the study's MLflow parent run
KIND = "reslab.kind"                    # ablation | search
TEXT = "reslab.file_text"               # the study file as written
BASE_TEXT = "reslab.base_text"          # its base spec as written
TRIAL_THREADS = "reslab.trial_threads"  # CPU threads every trial runs with (fixed when the study is made)
TRIAL_DEVICES = "reslab.trial_devices"  # GPUs (CPU processes) every trial trains on with DDP (fixed likewise)

# ---- Optuna trial attributes (search.trials.TrialRecord reads and writes them) ----
OUTCOME = "reslab.outcome"              # one of OUTCOMES
REASON = "reslab.reason"                # why it failed, was pruned or discarded
METRICS = "reslab.metrics"              # final metrics of the run and the costs: {name: value}
RUN_ID = "reslab.run_id"                # the trial's MLflow child run
COST = "reslab.cost"                    # params, MACs (and latency) of the trial's spec
WIDTH_MULTIPLIER = "reslab.width_multiplier"
ARM = "reslab.arm"                      # ablation cell: arm name ...
SEED = "reslab.seed"                    # ... and seed
RETRY_OF = "reslab.retry_of"            # number of the trial this one retries
ATTEMPT = "reslab.attempt"              # 1 for a first attempt
THREADS = "reslab.threads"              # CPU threads the trial ran with ...
DEVICE = "reslab.device"                # ... and where: cpu, or the GPU's name
WORKER_MEMORY_MB = "reslab.worker_memory_mb"  # peak resident memory of the worker that ran it (capacity)
WORKER = "reslab.worker"                # the process that claimed it: host, boot, pidns, pid, started (liveness)
JOB = "reslab.job"                      # the cluster job that runs it (SLURM: array id_task)
HOST = "reslab.host"                    # the machine that runs it
PACK = "reslab.pack"                    # the pack it trained in (search.packing; none: it trained alone) ...
PACK_SIZE = "reslab.pack_size"          # ... its members when it started ...
PACK_INDEX = "reslab.pack_index"        # ... and this trial's place in it
QUEUED = "fixed_params"                 # Optuna's own system attribute: the values a trial was enqueued with

# Outcomes: a result (never run again) ...
COMPLETE, PRUNED, DIVERGED, INVALID = "complete", "pruned", "diverged", "invalid"
FINAL_OUTCOMES = (COMPLETE, PRUNED, DIVERGED, INVALID)
# ... or an attempt that is retried (an error; a Ctrl-C), or a trial that never stood for a cell
ERROR, INTERRUPTED, DISCARDED = "error", "interrupted", "discarded"

# ---- MLflow tags of a study's runs ----
STUDY_TAG = "reslab.study"              # on the parent and every child
ROLE_TAG = "reslab.role"                # study | trial
KIND_TAG = "reslab.kind"                # on the parent: ablation | search
TRIAL_TAG = "reslab.trial"              # on children: the Optuna trial number
ATTEMPTS_TAG = "reslab.attempts"        # on a child resumed by a retry: its attempts' trial numbers, "3, 7"
TRIALS_TAG = "reslab.trials"            # on the parent: trial counts by state ("4 complete, 1 fail")
# (a child's state and failure reason use the tags every run has: runs.mlflow_write.STATE_TAG, FAILURE_TAG)
