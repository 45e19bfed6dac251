"""Launch ``patch_wise_dino.py`` on SLURM with submitit, as DINO's ``run_with_submitit.py`` does, with requeue
on preemption and time-out.

``python run_with_submitit.py --nodes 2 --ngpus 8 --arch vit_small --data_path ... --shared_folder ...`` takes
every flag of ``patch_wise_dino.py`` and the launcher's own, and submits one job of ``--nodes`` nodes with one
task per GPU. ``--cluster local`` runs the tasks on this machine with submitit's local executor (the same
Trainer, signals and requeue; the tests use it). ``--dry_run`` prints what would be submitted.

Rendezvous: each task reads its place in the job from ``submitit.JobEnvironment`` (under SLURM: SLURM_PROCID,
SLURM_NTASKS, SLURM_LOCALID and the first host of SLURM_JOB_NODELIST) and exports RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT, a port derived from the job id (every task computes the same one;
jobs sharing a node rarely collide). ``patch_wise_dino.main`` then joins the process group with ``env://`` as
under torchrun: rank 0 serves torch's TCP store on MASTER_ADDR, the others connect to it. No file on a shared
file system is involved.

Preemption and time-outs. submitit asks SLURM for its signal (``--signal=USR2@<--signal_delay_s>``) ahead of
the time limit, and clusters set up for submitit send it on preemption too. submitit's own handler would call
``Trainer.checkpoint`` and requeue at once, inside the handler, in the middle of a training step and on rank 0
only: the position inside the epoch would be lost. So while training runs, that signal is one more stop
signal of the run control (``patch_wise_dino.main(args, stop_signals=...)``): every process finishes its step,
they agree on the stopping point and rank 0 writes ``checkpoint.pth`` with the position inside the epoch,
exactly as on SIGTERM. Once ``main`` has returned (process group closed), the Trainer raises the signal again
for submitit's handler, which is back in place: on rank 0 it calls ``Trainer.checkpoint`` (a fresh Trainer
with the same arguments) and requeues the job (``scontrol requeue``; the local executor restarts the tasks);
the requeued job resumes from ``--output_dir`` at the same iteration, bit-identically with the same number of
tasks. Time-outs count against ``MAX_TIMEOUTS`` requeues (submitit's rule); preemptions do not. The signal
before training starts or after it ends goes straight to submitit's handler (nothing in progress to save).
Data-loading workers are forked while the run control's handlers are installed, so the signal, which SLURM
sends to every process of the job, is only recorded there too.

SIGTERM and SIGINT (which submitit's handler ignores) stop training the same way, with the in-epoch
checkpoint, but do not requeue: ``scancel`` means stop, and SLURM requeues a job it preempts with SIGTERM by
itself. The job then resumes from ``--output_dir``; submitting again with that ``--output_dir`` continues too.
"""
import argparse
import functools
import os
import shlex
import shutil
import signal
import sys
import time
import zlib
from typing import Dict, Optional

import submitit

import patch_wise_dino
import run_control
import utils

JOB_NAME = "patch_wise_dino"
DINO_WORKERS = 10  # DINO's data-loading workers per task, and the CPUs per task it asks SLURM for
MEM_GB_PER_GPU = 40  # DINO's request: 40 GB of host memory per GPU (SLURM's --mem is per node)
MAX_TIMEOUTS = 30  # requeues after a time-out before submitit gives up (DINO's value); preemptions are not counted
MASTER_PORTS = range(20000, 32768)  # below Linux's ephemeral ports (32768-60999), which clients take at random
SUBMITIT_FOLDER = "submitit"  # in --output_dir: submitit's pickles, sbatch script and the tasks' logs
SBATCH_NAMES = {"name": "job-name", "nodes": "nodes", "tasks_per_node": "ntasks-per-node",
                "gpus_per_node": "gpus-per-node", "cpus_per_task": "cpus-per-task", "mem_gb": "mem",
                "timeout_min": "time"}  # submitit's generic parameters as sbatch options


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Submitit for Patch-Wise DINO", parents=[patch_wise_dino.get_args_parser()],
                                     add_help=False)
    at_least_1 = utils.bounded(int, low=1)
    parser.add_argument("--nodes", default=2, type=at_least_1, help="number of nodes to request (DINO's default 2)")
    parser.add_argument("--ngpus", default=8, type=at_least_1,
                        help="GPUs to request on each node; one training task runs per GPU")
    parser.add_argument("--timeout", default=2800, type=at_least_1,
                        help="time limit of the job in minutes; near it the job checkpoints and is requeued")
    parser.add_argument("--partition", default=None, type=str,
                        help="SLURM partition to submit to (default: the cluster's default partition)")
    parser.add_argument("--comment", default=None, type=str, help="comment for the scheduler (sbatch --comment)")
    parser.add_argument("--constraint", default=None, type=str,
                        help="node features to require, e.g. volta32gb (sbatch --constraint)")
    parser.add_argument("--account", default=None, type=str, help="account to charge (sbatch --account)")
    parser.add_argument("--qos", default=None, type=str, help="quality of service (sbatch --qos)")
    parser.add_argument("--signal_delay_s", default=120, type=at_least_1,
                        help="seconds before the time limit at which the job is told to checkpoint and requeue: "
                             "enough for one step and writing a checkpoint")
    parser.add_argument("--shared_folder", default=None, type=str,
                        help="folder that every node can read and write; the run goes to a new dated folder in "
                             "it unless --output_dir is given")
    parser.add_argument("--cluster", default="slurm", choices=["slurm", "local"],
                        help="slurm submits with sbatch; local runs the tasks on this machine (one node)")
    parser.add_argument("--dry_run", action="store_true",
                        help="print the SLURM parameters and the training arguments, and submit nothing")
    parser.set_defaults(output_dir=None, num_workers=None)  # resolved by fill_defaults
    return parser


def main(args: argparse.Namespace) -> Optional[submitit.Job]:
    """Submit the training job (nothing with ``--dry_run``); returns the submitted job."""
    check_launch_args(args)
    fill_defaults(args)
    parameters = executor_parameters(args)
    if args.dry_run:
        print_plan(args, parameters)
        return None
    run_control.prepare_output_dir(args.output_dir)
    folder = os.path.join(args.output_dir, SUBMITIT_FOLDER)
    executor = submitit.AutoExecutor(folder=folder, cluster=args.cluster, slurm_max_num_timeout=MAX_TIMEOUTS,
                                     local_max_num_timeout=MAX_TIMEOUTS)
    executor.update_parameters(**parameters)
    job = executor.submit(Trainer(args))
    print(f"Submitted job {job.job_id} ({args.cluster}: {args.nodes} node(s) x {args.ngpus} task(s), one per GPU)")
    print(f"Command: {shlex.join(['python', *sys.argv])}")
    if args.cluster == "slurm":
        print(f"sbatch script: {job.paths.submission_file}")
    print(f"Logs: {folder}/{job.job_id}_<task>_log.out and .err (training progress: task 0, {job.paths.stdout})")
    print(f"Checkpoints, log.txt and args.json: {args.output_dir} (the job resumes from there when requeued)")
    return job


def check_launch_args(args: argparse.Namespace) -> None:
    """The rules between the launcher's flags, and the training flags' own, before anything is submitted."""
    if args.output_dir is None and args.shared_folder is None:
        raise utils.UserError("give --shared_folder (a folder every node can read and write; the run goes to a "
                              "dated folder in it) or --output_dir")
    if args.cluster == "local" and args.nodes != 1:
        raise utils.UserError(f"--cluster local runs on this machine only: use --nodes 1 (not {args.nodes})")
    patch_wise_dino.check_args(args)
    if args.cluster == "slurm" and not args.dry_run and shutil.which("srun") is None:
        raise utils.UserError("SLURM's srun is not on this machine's PATH: submit from a SLURM login node, or run "
                              "the tasks here with --cluster local --nodes 1")


def fill_defaults(args: argparse.Namespace) -> None:
    """Absolute paths (a new dated folder in --shared_folder without --output_dir), and --num_workers: DINO's
    10 per task on SLURM (the job asks for as many CPUs), this machine's CPUs per task if fewer with the local
    executor."""
    args.output_dir = os.path.abspath(args.output_dir or dated_folder(args.shared_folder))
    if args.data_path:
        args.data_path = os.path.abspath(args.data_path)
    if args.num_workers is None:
        cpus = DINO_WORKERS if args.cluster == "slurm" else (os.cpu_count() or 1) // args.ngpus
        args.num_workers = max(1, min(DINO_WORKERS, cpus))


def dated_folder(shared_folder: str) -> str:
    """A folder in ``shared_folder`` named after the current time that does not exist yet."""
    base = os.path.join(shared_folder, time.strftime("%Y-%m-%d_%H-%M-%S"))
    path, count = base, 1
    while os.path.exists(path):
        path, count = f"{base}_{count}", count + 1
    return path


def executor_parameters(args: argparse.Namespace) -> dict:
    """submitit's ``AutoExecutor`` parameters: one task per GPU, a CPU per data-loading worker (at least one),
    DINO's memory per GPU, the optional SLURM options given, and the repository on the tasks' PYTHONPATH
    (they unpickle the Trainer)."""
    setup = [f"export PYTHONPATH={shlex.quote(utils.REPO_DIR)}${{PYTHONPATH:+:$PYTHONPATH}}"]
    parameters = {"name": JOB_NAME, "nodes": args.nodes, "tasks_per_node": args.ngpus, "gpus_per_node": args.ngpus,
                  "cpus_per_task": max(1, args.num_workers), "mem_gb": MEM_GB_PER_GPU * args.ngpus,
                  "timeout_min": args.timeout, "slurm_signal_delay_s": args.signal_delay_s,
                  "slurm_setup": setup, "local_setup": setup}
    for name in ("partition", "comment", "constraint", "account", "qos"):
        if getattr(args, name):
            parameters[f"slurm_{name}"] = getattr(args, name)
    return parameters


def sbatch_options(parameters: dict) -> list:
    """The sbatch options that submitit writes for ``parameters`` (``--name=value``), in its order."""
    options = {SBATCH_NAMES[name]: value for name, value in parameters.items() if name in SBATCH_NAMES}
    options["mem"] = f"{options['mem']}GB"
    options["signal"] = f"{submitit.JobEnvironment.USR_SIG}@{parameters['slurm_signal_delay_s']}"
    options.update({name[len("slurm_"):]: value for name, value in parameters.items()
                    if name.startswith("slurm_") and name not in ("slurm_signal_delay_s", "slurm_setup")})
    return [f"--{name.replace('_', '-')}={value}" for name, value in sorted(options.items())]


def print_plan(args: argparse.Namespace, parameters: dict) -> None:
    if args.cluster == "slurm":
        print("SLURM parameters (sbatch):\n" + "\n".join(f"  {option}" for option in sbatch_options(parameters)))
    else:
        print(f"Local job: {args.ngpus} task(s) on this machine, time limit {args.timeout} min")
    print(f"Tasks start with: {parameters['slurm_setup'][0]}")
    print("Training arguments:\n" + "\n".join(f"  {k}: {v}" for k, v in sorted(vars(args).items())))
    print(f"Dry run: nothing submitted. Checkpoints and log.txt would go to {args.output_dir}, the tasks' logs to "
          f"{os.path.join(args.output_dir, SUBMITIT_FOLDER)}")


# ----------------------------------------------------------------------------------------------------
# In each task
# ----------------------------------------------------------------------------------------------------
def preemption_signal() -> int:
    """The signal submitit asks SLURM to send before a time-out or a preemption (USR2 unless
    SUBMITIT_PREEMPT_SIGNAL names another)."""
    return getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)


def master_port(job_id: str) -> int:
    """The rendezvous port of a job: the same in every task, spread over ``MASTER_PORTS`` by the job id."""
    return MASTER_PORTS.start + zlib.crc32(job_id.encode()) % len(MASTER_PORTS)


def distributed_env(job: submitit.JobEnvironment) -> Dict[str, str]:
    """torch's ``env://`` variables of this task, from submitit's job environment."""
    return {"MASTER_ADDR": job.hostnames[0], "MASTER_PORT": str(master_port(job.job_id)),
            "RANK": str(job.global_rank), "WORLD_SIZE": str(job.num_tasks), "LOCAL_RANK": str(job.local_rank)}


class Trainer:
    """What every task of the job runs: ``patch_wise_dino.main`` with the submitted arguments, with the
    preemption signal as a stop signal; then, if that signal stopped training, submitit's requeue."""

    def __init__(self, args: argparse.Namespace):
        self.args = args

    def __call__(self) -> None:
        job = submitit.JobEnvironment()
        os.environ.update(distributed_env(job))
        preemption = preemption_signal()
        train = functools.partial(patch_wise_dino.main, stop_signals=run_control.STOP_SIGNALS + (preemption,))
        state = utils.run_cli(train, argparse.Namespace(**vars(self.args)))  # main adds to its copy
        if preemption in state.stopped_by:
            print(f"Requeueing job {job.job_id}: it resumes from {self.args.output_dir}", flush=True)
            signal.raise_signal(preemption)  # submitit's handler: on rank 0, checkpoint() and requeue
        elif state.stopped_by:
            print(f"Not requeued (stopped by {', '.join(signal.Signals(s).name for s in state.stopped_by)}): to "
                  f"continue, submit again with --output_dir {self.args.output_dir}", flush=True)

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on rank 0 before it requeues the job: what the requeued job runs, a fresh Trainer
        with the same arguments, which resumes from the checkpoint in --output_dir."""
        return submitit.helpers.DelayedSubmission(type(self)(self.args))


if __name__ == "__main__":
    utils.run_cli(main, utils.ArgumentParser("Submitit for Patch-Wise DINO", parents=[get_args_parser()]).parse_args())
