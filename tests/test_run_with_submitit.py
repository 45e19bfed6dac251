"""run_with_submitit.py without a cluster: submitit's local executor runs the real Trainer in its own processes
on the CPU (one epoch of vit_tiny on the sample photos, 6 iterations); a fake sbatch receives what SLURM would;
the preemption signal mid-epoch leaves an in-epoch checkpoint, requeues, and the requeued run ends as an
uninterrupted one.
"""
import argparse
import builtins
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import submitit

import patch_wise_dino as pwd
import run_control
import run_with_submitit as rws
import utils
from eval_testdata import REPO, assert_one_line_error, assert_same_training, read_log, run_cli_here

SMALL = ["--arch", "vit_tiny", "--patch_size", "16", "--global_size", "32", "--local_size", "16", "--resize", "48",
         "--out_dim", "64", "--batch_size_per_gpu", "2", "--local_crops_number", "2", "--use_fp16", "false",
         "--print_freq", "1", "--epochs", "1", "--seed", "3"]
LOCAL = ["--cluster", "local", "--nodes", "1", "--ngpus", "1"]
STEPS = 6  # 13 sample photos, batch 2
PREEMPTION = getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)
# One thread here as in the tasks (OMP_NUM_THREADS=1): bit-identical results need the same thread count.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def task_env(monkeypatch):
    """The environment the local executor hands to its tasks."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def parse(argv):
    return argparse.ArgumentParser(parents=[rws.get_args_parser()]).parse_args(argv)


def submit(argv):
    saved_print = builtins.print
    try:
        return rws.main(parse(argv))
    finally:
        builtins.print = saved_print


def job_processes(job_id):
    """The pids of a local job's tasks and their data workers (they inherit SUBMITIT_LOCAL_JOB_ID)."""
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if f"\0SUBMITIT_LOCAL_JOB_ID={job_id}\0".encode() in b"\0" + f.read():
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def wait_for(condition, what, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def finish(job):
    wait_for(job.done, "the local job")
    return job.task(0).stdout() or "", job.task(0).stderr() or ""


def signal_mid_epoch(job, signum, steps=STEPS):
    """Once task 0 has printed iteration 1, send ``signum`` to every process of the job (as SLURM does)."""
    wait_for(lambda: f"[1/{steps}]" in (job.stdout() or ""), "iteration 1")
    for pid in job_processes(job.job_id):
        os.kill(pid, signum)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One epoch through the command line, run from another folder (the tasks unpickle the Trainer from
    there): (output folder, launcher stdout)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "run_with_submitit.py"), *SMALL, *LOCAL,
                           "--num_workers", "0", "--output_dir", "out"], cwd=root, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = re.search(r"Submitted job (\d+) \(local", proc.stdout).group(1)
    job = submitit.LocalJob(root / "out" / rws.SUBMITIT_FOLDER, job_id)
    wait_for(lambda: job.paths.result_pickle.exists(), "the local job's result")
    assert job.result() is None, job.stderr()
    wait_for(lambda: not job_processes(job_id), "the local job's end")
    return root / "out", proc.stdout


def test_an_extra_stop_signal_stops_at_the_agreed_point_and_is_returned(tmp_path, monkeypatch, fresh_process_group):
    real_step, calls = pwd.train_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), PREEMPTION)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(pwd, "train_step", step)
    previous = signal.signal(PREEMPTION, signal.SIG_IGN)  # before and after training: as submitit's handler
    try:
        args = argparse.ArgumentParser(parents=[pwd.get_args_parser()]).parse_args(
            SMALL + ["--num_workers", "0", "--epochs", "2", "--output_dir", str(tmp_path)])
        state = pwd.main(args, stop_signals=run_control.STOP_SIGNALS + (PREEMPTION,))
        assert signal.getsignal(PREEMPTION) == signal.SIG_IGN  # restored
    finally:
        signal.signal(PREEMPTION, previous)
    assert state.stopped_by == (PREEMPTION,)
    checkpoint = utils.load_checkpoint(str(tmp_path / "checkpoint.pth"))
    assert (checkpoint["epoch"], checkpoint["iteration"]) == (0, 2)
    assert not (tmp_path / "log.txt").exists()
    assert pwd.main(args).stopped_by == ()  # resumed to the end


def test_local_run_writes_what_patch_wise_dino_writes(uninterrupted, tmp_path, fresh_process_group):
    out, launcher_stdout = uninterrupted
    assert f"Checkpoints, log.txt and args.json: {out}" in launcher_stdout
    assert f"Logs: {out}/submitit/" in launcher_stdout and "Command: python " in launcher_stdout
    args = argparse.ArgumentParser(parents=[pwd.get_args_parser()]).parse_args(
        SMALL + ["--num_workers", "0", "--output_dir", str(tmp_path)])
    pwd.main(args)  # the same training in this process, without submitit
    assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path) + [rws.SUBMITIT_FOLDER])
    assert_same_training(tmp_path, out)  # same checkpoint keys and values, same log.txt lines
    assert read_log(out)[0].keys() == read_log(tmp_path)[0].keys()
    ours, theirs = (utils.load_checkpoint(str(folder / "checkpoint.pth")) for folder in (out, tmp_path))
    assert ours.keys() == theirs.keys() and ours["args"].cluster == "local"


def test_preemption_mid_epoch_checkpoints_requeues_and_resumes_to_the_same_end(uninterrupted, tmp_path, task_env):
    job = submit(SMALL + LOCAL + ["--num_workers", "1", "--output_dir", str(tmp_path)])
    signal_mid_epoch(job, PREEMPTION)
    stdout, stderr = finish(job)
    assert job.result() is None, stderr
    stop = re.search(rf"Stopped by {PREEMPTION.name} after epoch 0, iteration (\d+) of {STEPS}: checkpoint saved",
                     stdout)
    assert stop, stdout[-3000:] + stderr[-3000:]
    iteration = int(stop.group(1))
    assert 0 < iteration < STEPS
    assert f"Caught signal {PREEMPTION.name}" in stderr and f"Requeued job {job.job_id}" in stdout  # by submitit
    assert f"Resuming from {tmp_path}/checkpoint.pth: epoch 0, iteration {iteration}" in stdout
    in_epoch = utils.load_checkpoint(str(tmp_path / "checkpoint.prev.pth"))  # kept when the epoch ended
    assert (in_epoch["epoch"], in_epoch["iteration"]) == (0, iteration)
    assert_same_training(uninterrupted[0], tmp_path)


def test_sigterm_to_two_tasks_stops_both_at_one_checkpoint_without_requeue(tmp_path, task_env):
    """Two tasks meet through submitit's environment; SIGTERM (which submitit's handler ignores) to every
    process of the job stops both at the same iteration after the in-epoch checkpoint, and the job ends."""
    job = submit(SMALL + ["--cluster", "local", "--nodes", "1", "--ngpus", "2", "--batch_size_per_gpu", "1",
                          "--num_workers", "1", "--output_dir", str(tmp_path)])
    signal_mid_epoch(job, signal.SIGTERM, steps=7)  # 13 photos padded to 14 for 2 tasks, batch 1
    finish(job)
    logs = [(task.stdout() or "") + (task.stderr() or "") for task in (job.task(0), job.task(1))]
    assert job.results() == [None, None], logs
    assert "rank 1/2" in logs[1] and "Traceback" not in logs[1]
    iteration = int(re.search(r"Stopped by SIGTERM after epoch 0, iteration (\d+) of 7", logs[0]).group(1))
    assert f"Not requeued (stopped by SIGTERM): to continue, submit again with --output_dir {tmp_path}" in logs[0]
    assert "Requeued" not in logs[0] and "Resuming" not in logs[0]
    checkpoint = utils.load_checkpoint(str(tmp_path / "checkpoint.pth"))
    assert (checkpoint["epoch"], checkpoint["iteration"], checkpoint["world_size"]) == (0, iteration, 2)
    assert 0 < iteration < 7 and len(checkpoint["rng"]) == 2  # both tasks' generator states


def test_dry_run_shows_the_slurm_parameters_of_2_nodes_of_8_gpus(tmp_path, capsys):
    assert submit(["--dry_run", "--nodes", "2", "--ngpus", "8", "--arch", "vit_small", "--partition", "gpu",
                   "--account", "vision", "--data_path", "data", "--shared_folder", str(tmp_path)]) is None
    out = capsys.readouterr().out
    options = re.findall(r"^  (--[a-z-]+=.*)$", out, flags=re.M)
    assert options == ["--account=vision", "--cpus-per-task=10", "--gpus-per-node=8", "--job-name=patch_wise_dino",
                       "--mem=320GB", "--nodes=2", "--ntasks-per-node=8", "--partition=gpu",
                       f"--signal={PREEMPTION.name[3:]}@120", "--time=2800"]  # no --qos, --constraint, --comment
    assert "  arch: vit_small\n" in out and f"  data_path: {os.path.abspath('data')}\n" in out
    output_dir = re.search(r"  output_dir: (.*)\n", out).group(1)
    assert re.fullmatch(re.escape(str(tmp_path)) + r"/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", output_dir)
    assert "Dry run: nothing submitted" in out and os.listdir(tmp_path) == []


def fake_slurm(folder):
    """srun and sbatch on PATH: sbatch keeps the script it is given and answers as SLURM does."""
    folder.mkdir()
    (folder / "srun").write_text("#!/bin/sh\nexit 1\n")
    (folder / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {folder}/submitted.sh\necho "Submitted batch job 4242"\n')
    for name in ("srun", "sbatch"):
        os.chmod(folder / name, 0o755)


def test_slurm_submission_is_what_the_dry_run_shows(tmp_path, monkeypatch, capsys):
    fake_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    argv = ["--nodes", "2", "--ngpus", "8", "--qos", "high", "--constraint", "volta32gb", "--timeout", "60",
            "--signal_delay_s", "300", "--output_dir", str(tmp_path / "run")]
    submit(argv + ["--dry_run"])
    options = re.findall(r"^  (--[a-z-]+=.*)$", capsys.readouterr().out, flags=re.M)
    job = submit(argv)
    out = capsys.readouterr().out
    script = (tmp_path / "bin" / "submitted.sh").read_text()
    assert job.job_id == "4242" and "Submitted job 4242 (slurm: 2 node(s) x 8 task(s), one per GPU)" in out
    assert f"sbatch script: {tmp_path}/run/submitit/4242_submission.sh" in out
    assert f"Logs: {tmp_path}/run/submitit/4242_<task>_log.out" in out
    assert "--qos=high" in options and "--signal=USR2@300" in options and "--time=60" in options
    for option in options:
        assert f"#SBATCH {option}\n" in script
    assert f"export PYTHONPATH={REPO}" in script and " -u -m submitit.core._submit " in script
    delayed = submitit.helpers.DelayedSubmission.load(job.paths.submitted_pickle)
    assert isinstance(delayed.function, rws.Trainer) and delayed.function.args.output_dir == str(tmp_path / "run")


def test_each_task_finds_its_place_from_the_slurm_job_environment(monkeypatch):
    env = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "16", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_PROCID": "9", "SLURM_LOCALID": "1"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    task_9 = rws.distributed_env(submitit.JobEnvironment())
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    task_0 = rws.distributed_env(submitit.JobEnvironment())
    assert {k: v for k, v in task_9.items() if k != "MASTER_PORT"} == {
        "MASTER_ADDR": "gpu07", "RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1"}
    assert task_0["RANK"] == "0" and task_0["MASTER_PORT"] == task_9["MASTER_PORT"]
    assert int(task_9["MASTER_PORT"]) in rws.MASTER_PORTS
    assert rws.master_port("4243") != rws.master_port("4242")


@pytest.mark.parametrize("extra,needle", [
    ([], "give --shared_folder (a folder every node can read and write"),
    (["--ngpus", "0", "--output_dir", "o"], "argument --ngpus: must be at least 1, got 0"),
    (["--cluster", "local", "--nodes", "2", "--output_dir", "o"], "--cluster local runs on this machine only: use "
                                                                  "--nodes 1 (not 2)"),
    (["--output_dir", "o"], "SLURM's srun is not on this machine's PATH"),
    (["--global_size", "36", "--output_dir", "o"], "--global_size 36 is not a positive multiple of --patch_size 8"),
])
def test_bad_launch_arguments_are_one_line_errors(tmp_path, monkeypatch, capsys, extra, needle):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(run_cli_here(rws.main, utils.ArgumentParser(parents=[rws.get_args_parser()]), extra, capsys),
                          needle)
    assert os.listdir(tmp_path) == []  # nothing created, nothing submitted

