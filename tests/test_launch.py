"""Launch scripts (launch/) and the submitit launcher config; no GPU or SLURM needed.

SLURM commands (scontrol, srun, scancel) and nvidia-smi are replaced by fakes on PATH.
"""
import dataclasses
import os
import shutil
import signal
import stat
import subprocess
import time
import warnings
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["launch/torchrun.sh", "launch/multinode.sh", "launch/slurm.sbatch"]
LAUNCHER_YAML = ROOT / "conf/hydra/launcher/submitit_slurm.yaml"

# Variables the scripts read: never inherit them from the machine running the tests.
SCRIPT_VARS = {"DRY_RUN", "NPROC", "NNODES", "NPROC_PER_NODE", "MASTER_ADDR", "MASTER_PORT",
               "RDZV_ID", "MAX_RESTARTS", "CUDA_VISIBLE_DEVICES"}


def _fake(bindir: Path, name: str, body: str) -> None:
    path = bindir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


@pytest.fixture
def fakebin(tmp_path):
    """A bin dir first on PATH with fake SLURM tools; calls are logged to tmp_path/calls."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    _fake(bindir, "nvidia-smi", "exit 1\n")  # no GPUs, even on a GPU machine
    _fake(bindir, "scontrol", 'case $1 in\n'
          '  show) [[ $2 == hostnames && $3 == "node[1-2]" ]] && printf "node1\\nnode2\\n" ;;\n'
          '  *) echo "scontrol $*" >> "$FAKE_DIR/calls" ;;\nesac\n')
    return bindir


def _env(fakebin: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in SCRIPT_VARS}
    env["PATH"] = f"{fakebin}{os.pathsep}{env['PATH']}"
    env["FAKE_DIR"] = str(fakebin.parent)
    env.update(extra)
    return env


def _dry_run(script, args, env, cwd) -> subprocess.CompletedProcess:
    env = dict(env, DRY_RUN="1")
    return subprocess.run(["bash", str(script), *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=30)


def _line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout
    return lines[0]


# --------------------------------------------------------------------------- all scripts
@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", str(ROOT / script)], check=True)


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_executable(script):
    assert os.stat(ROOT / script).st_mode & stat.S_IXUSR
    tracked = subprocess.run(["git", "ls-files", "-s", script], cwd=ROOT,
                             capture_output=True, text=True).stdout
    if tracked:  # git must record the mode too
        assert tracked.startswith("100755"), tracked


# --------------------------------------------------------------------------- torchrun.sh
@pytest.mark.slow
def test_torchrun_dry_run_env_nproc(fakebin, tmp_path):
    out = _dry_run(ROOT / "launch/torchrun.sh", ["model=resnet50"],
                   _env(fakebin, NPROC="2"), cwd=tmp_path)  # from any cwd
    assert _line(out) == "torchrun --standalone --nproc_per_node=2 --max-restarts=0 train.py model=resnet50"
    out = _dry_run(ROOT / "launch/torchrun.sh", ["model=resnet50"],
                   _env(fakebin, NPROC="2", MAX_RESTARTS="3"), cwd=tmp_path)
    assert "--max-restarts=3 train.py" in _line(out)


@pytest.mark.slow
def test_torchrun_dry_run_positional_nproc_and_quoting(fakebin, tmp_path):
    out = _dry_run(ROOT / "launch/torchrun.sh", ["8", "model=resnet50", "optim.lr=0.1"],
                   _env(fakebin, NPROC="2"), cwd=tmp_path)
    assert _line(out) == ("torchrun --standalone --nproc_per_node=8 --max-restarts=0 train.py "
                          "model=resnet50 optim.lr=0.1")
    out = _dry_run(ROOT / "launch/torchrun.sh", ["tag=a b"], _env(fakebin), cwd=tmp_path)
    assert _line(out).endswith(r"train.py tag=a\ b")  # printed so that it can be pasted


@pytest.mark.slow
def test_torchrun_gpu_count(fakebin, tmp_path):
    script = ROOT / "launch/torchrun.sh"
    assert _line(_dry_run(script, [], _env(fakebin), tmp_path)).endswith("--nproc_per_node=1 --max-restarts=0 train.py")
    _fake(fakebin, "nvidia-smi",
          'printf "GPU 0: H100 (UUID: a)\\nGPU 1: H100 (UUID: b)\\nGPU 2: H100 (UUID: c)\\n"\n')
    assert _line(_dry_run(script, [], _env(fakebin), tmp_path)).endswith("--nproc_per_node=3 --max-restarts=0 train.py")
    env = _env(fakebin, CUDA_VISIBLE_DEVICES="0,1")
    assert _line(_dry_run(script, [], env, tmp_path)).endswith("--nproc_per_node=2 --max-restarts=0 train.py")


# --------------------------------------------------------------------------- multinode.sh
@pytest.mark.slow
def test_multinode_dry_run(fakebin, tmp_path):
    env = _env(fakebin, NNODES="2", NPROC_PER_NODE="8", MASTER_ADDR="node1", RDZV_ID="r50")
    out = _dry_run(ROOT / "launch/multinode.sh", ["model=resnet50"], env, cwd=tmp_path)
    assert _line(out) == (
        "torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d "
        "--rdzv-endpoint=node1:29500 --rdzv-id=r50 --max-restarts=0 train.py model=resnet50")


@pytest.mark.slow
def test_multinode_dry_run_overrides_and_slurm_job_id(fakebin, tmp_path):
    env = _env(fakebin, NNODES="1:4", NPROC_PER_NODE="4", MASTER_ADDR="10.0.0.1",
               MASTER_PORT="1234", MAX_RESTARTS="3", SLURM_JOB_ID="777")
    out = _dry_run(ROOT / "launch/multinode.sh", [], env, cwd=tmp_path)
    assert _line(out) == (
        "torchrun --nnodes=1:4 --nproc_per_node=4 --rdzv-backend=c10d "
        "--rdzv-endpoint=10.0.0.1:1234 --rdzv-id=777 --max-restarts=3 train.py")


@pytest.mark.slow
@pytest.mark.parametrize("missing", ["NNODES", "MASTER_ADDR", "RDZV_ID"])
def test_multinode_requires(fakebin, tmp_path, missing):
    env = _env(fakebin, NNODES="2", MASTER_ADDR="node1", RDZV_ID="r50")
    del env[missing]
    out = _dry_run(ROOT / "launch/multinode.sh", [], env, cwd=tmp_path)
    assert out.returncode != 0 and missing in out.stderr and not out.stdout


# --------------------------------------------------------------------------- slurm.sbatch
SLURM_ENV = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NNODES": "2",
             "SLURM_CPUS_PER_TASK": "64", "SLURM_GPUS_ON_NODE": "8"}
SRUN_LINE = (
    "srun --ntasks-per-node=1 --kill-on-bad-exit=1 --cpus-per-task=64 "
    "torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d "
    "--rdzv-endpoint=node1:29500 --rdzv-id=4242 --max-restarts=0 --shutdown-timeout=120 "
    "train.py hydra.run.dir=outputs/slurm/4242 model=resnet50")


def test_sbatch_header():
    text = (ROOT / "launch/slurm.sbatch").read_text()
    for directive in ["--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=",
                      "--nodes=", "--time=", "--requeue", "--signal=B:USR1@180"]:
        assert f"#SBATCH {directive}" in text, directive


@pytest.mark.slow
def test_sbatch_dry_run(fakebin, tmp_path):
    out = _dry_run(ROOT / "launch/slurm.sbatch", ["model=resnet50"],
                   _env(fakebin, **SLURM_ENV), cwd=tmp_path)
    assert _line(out) == SRUN_LINE


@pytest.mark.slow
def test_sbatch_dry_run_from_spool_copy(fakebin, tmp_path):
    """sbatch runs a copy of the script from its spool dir: the repo is found via SLURM_SUBMIT_DIR."""
    spooled = tmp_path / "spool" / "slurm_script"
    spooled.parent.mkdir()
    shutil.copy(ROOT / "launch/slurm.sbatch", spooled)
    env = _env(fakebin, **SLURM_ENV, SLURM_SUBMIT_DIR=str(ROOT))
    assert _line(_dry_run(spooled, ["model=resnet50"], env, cwd=ROOT)) == SRUN_LINE
    env = _env(fakebin, **SLURM_ENV, SLURM_SUBMIT_DIR=str(tmp_path))
    out = _dry_run(spooled, [], env, cwd=tmp_path)
    assert out.returncode != 0 and not out.stdout


@pytest.mark.slow
def test_sbatch_requires_slurm(fakebin, tmp_path):
    out = _dry_run(ROOT / "launch/slurm.sbatch", [], _env(fakebin), cwd=tmp_path)
    assert out.returncode != 0 and "SLURM_JOB_ID" in out.stderr


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.fixture
def fake_step(fakebin):
    """Fake srun (standing in for the whole step: torchrun + workers) and scancel.

    FAKE_STEP=wait: run until SIGTERM, then exit 1 as torchrun does after forwarding it.
    FAKE_STEP=<n>: exit n at once.
    """
    _fake(fakebin, "srun", 'echo $$ > "$FAKE_DIR/srun.pid.tmp"; mv "$FAKE_DIR/srun.pid.tmp" "$FAKE_DIR/srun.pid"\n'
          '[[ $FAKE_STEP == wait ]] || exit "$FAKE_STEP"\n'
          'trap \'echo "step got TERM" >> "$FAKE_DIR/calls"; exit 1\' TERM\n'
          'while :; do sleep 0.05; done\n')
    _fake(fakebin, "scancel", 'echo "scancel $*" >> "$FAKE_DIR/calls"\n'
          'kill -TERM "$(cat "$FAKE_DIR/srun.pid")"\n')
    return fakebin


def _start_sbatch(fakebin: Path, step: str) -> subprocess.Popen:
    env = _env(fakebin, **SLURM_ENV, FAKE_STEP=step)
    return subprocess.Popen(["bash", str(ROOT / "launch/slurm.sbatch"), "model=resnet50"],
                            env=env, cwd=fakebin.parent, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _calls(fakebin: Path) -> list:
    calls = fakebin.parent / "calls"
    return calls.read_text().splitlines() if calls.exists() else []


@pytest.mark.slow
def test_sbatch_usr1_forwards_sigterm_and_requeues(fake_step):
    proc = _start_sbatch(fake_step, "wait")
    _wait_for(fake_step.parent / "srun.pid", proc)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, err
    assert _calls(fake_step) == ["scancel --signal=TERM 4242", "step got TERM",
                                 "scontrol requeue 4242"]


@pytest.mark.slow
def test_sbatch_sigterm_does_not_requeue(fake_step):
    proc = _start_sbatch(fake_step, "wait")
    pidfile = fake_step.parent / "srun.pid"
    _wait_for(pidfile, proc)
    proc.send_signal(signal.SIGTERM)  # scancel/preemption: the shell survives ...
    time.sleep(0.5)
    assert proc.poll() is None
    os.kill(int(pidfile.read_text()), signal.SIGTERM)  # ... and SLURM signals the step itself
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, err
    assert _calls(fake_step) == ["step got TERM"]


@pytest.mark.slow
@pytest.mark.parametrize("step_rc,requeued", [(75, True), (0, False), (3, False)])
def test_sbatch_requeue_on_exit_75(fake_step, step_rc, requeued):
    proc = _start_sbatch(fake_step, str(step_rc))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == step_rc, err
    assert _calls(fake_step) == (["scontrol requeue 4242"] if requeued else [])


# --------------------------------------------------------------------------- submitit yaml
def _slurm_queue_conf():
    config = pytest.importorskip("hydra_plugins.hydra_submitit_launcher.config")
    return config.SlurmQueueConf


def test_submitit_yaml_keys_match_dataclass():
    schema = _slurm_queue_conf()
    fields = {f.name for f in dataclasses.fields(schema)}
    cfg = OmegaConf.load(LAUNCHER_YAML)
    keys = set(cfg.keys())
    assert keys <= fields, f"unknown keys: {keys - fields}"
    # No `defaults:` is possible (see the yaml), so every field must be spelled out.
    assert keys == fields, f"missing keys: {fields - keys}"
    assert cfg._target_ == schema._target_
    OmegaConf.merge(OmegaConf.structured(schema), cfg)  # values type-check against the schema
    assert (cfg.nodes, cfg.tasks_per_node, cfg.gpus_per_node) == (1, 8, 8)
    assert cfg.gpus_per_task is None  # every rank must see all 8 GPUs: LOCAL_RANK picks one


@pytest.mark.slow
def test_submitit_setup_exports_master_addr_port(fakebin):
    cfg = OmegaConf.load(LAUNCHER_YAML)
    script = "\n".join(cfg.setup) + '\necho "$MASTER_ADDR $MASTER_PORT"\n'
    env = _env(fakebin, **SLURM_ENV)
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], env=env,
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["node1", str(20000 + 4242 % 20000)]


def _write_app_conf(tmp_path: Path) -> Path:
    """A primary config (conf/train.yaml may not exist yet) with conf/ on the search path."""
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "app.yaml").write_text(
        f"hydra:\n  searchpath:\n    - file://{ROOT / 'conf'}\n")
    return conf


def test_submitit_yaml_composes_and_builds_sbatch(fakebin, tmp_path, monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    submitit = pytest.importorskip("submitit")
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    _fake(fakebin, "srun", "exit 0\n")  # submitit refuses to build a SLURM executor without srun
    monkeypatch.setenv("PATH", f"{fakebin}{os.pathsep}{os.environ['PATH']}")
    with initialize_config_dir(config_dir=str(_write_app_conf(tmp_path)), version_base="1.3"):
        with warnings.catch_warnings():
            # "validated against ConfigStore schema with the same name": expected, see the yaml
            warnings.simplefilter("ignore", UserWarning)
            cfg = compose("app", overrides=["hydra/launcher=submitit_slurm"],
                          return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        launcher = instantiate(cfg.hydra.launcher)
    # (Hydra's plugin discovery may import the module a second time: compare by name.)
    cls = type(launcher)
    assert f"{cls.__module__}.{cls.__name__}" == _slurm_queue_conf()._target_

    # Same parameter plumbing as SlurmLauncher.launch(), without submitting.
    params = dict(launcher.params)
    executor = submitit.AutoExecutor(cluster="slurm", folder=str(tmp_path / "submitit"),
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    params.pop("submitit_folder")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    text = executor._executor._make_submission_file_text("python -m submitit.core._submit x", "u")
    for line in ["#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --requeue", "#SBATCH --signal=USR2@180",
                 'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)']:
        assert line in text.splitlines(), (line, text)
