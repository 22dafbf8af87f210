"""cluster.yaml: validated offline with Ray's launcher schema, and run end to end (`ray up`, `ray submit`,
`ray down`) against this machine as a one-node cluster reached over ssh on 127.0.0.1.

The end-to-end test starts its own sshd (key login only, bound to 127.0.0.1) inside new PID and mount
namespaces, so that the "node" it logs in to is isolated from the rest of this machine:
- `ray down` runs `ray stop` on the head, and `ray stop` stops every Ray process it can see. In the
  namespace it sees only this test's cluster, never the Ray clusters other tests (or people) run here.
- the node's home directory and /tmp/ray are private directories of the test, so what the launcher writes
  there (~/.bashrc, ~/ray_bootstrap_*, ~/train_deep.py, the mounted copy of the project, the cluster address
  file) leaves this machine's real ones alone. The node's Python environment is a venv in the test's tmp
  dir (sharing this interpreter's packages), so `pip install -e` there does not touch the real install.
Stopping sshd (the namespace's first process) kills whatever is left in the namespace, and nothing else.
"""

from __future__ import annotations

import copy
import errno
import getpass
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import psutil
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
ENV_LINE = re.compile(r'HSIC_RAY_ENV="[^"]*"')
# What the node needs of the project to `pip install -e` it and run the job.
PROJECT_FILES = ["hsic_ray", "jobs", "pyproject.toml", "README.md", "cluster.yaml"]
SYSTEM_TOOLS = {"sshd": "openssh-server", "ssh": "openssh-client", "ssh-keygen": "openssh-client", "rsync": "rsync"}


def load_cluster_yaml() -> dict:
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


def fill(config: dict, *, head_ip: str, worker_ips: list[str], ssh_user: str, ssh_key: str,
         env_dir: str | None = None, cluster_name: str | None = None) -> dict:
    """cluster.yaml with its placeholders filled in, as a user would."""
    config = copy.deepcopy(config)
    config["provider"]["head_ip"] = head_ip
    config["provider"]["worker_ips"] = list(worker_ips)
    config["auth"]["ssh_user"] = ssh_user
    config["auth"]["ssh_private_key"] = ssh_key
    if cluster_name:
        config["cluster_name"] = cluster_name
    if env_dir:
        hits = [i for i, c in enumerate(config["setup_commands"]) if ENV_LINE.search(c)]
        assert len(hits) == 1, "cluster.yaml: expected one setup command that sets HSIC_RAY_ENV=\"...\""
        config["setup_commands"][hits[0]] = ENV_LINE.sub(f'HSIC_RAY_ENV="{env_dir}"', config["setup_commands"][hits[0]])
    return config


# ---------------------------------------------------------------------------------------------------------------
# Offline: the file as shipped, filled in, passes Ray's own launcher validation.


def test_cluster_yaml_has_placeholders_and_passes_ray_validation(tmp_path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load_cluster_yaml()
    assert raw["provider"]["type"] == "local"
    assert set(raw["provider"]) >= {"head_ip", "worker_ips"}
    assert set(raw["auth"]) >= {"ssh_user", "ssh_private_key"}
    assert raw["file_mounts"] == {"~/hsic-ray": "."}
    assert any("pip install -e ~/hsic-ray" in c for c in raw["setup_commands"])
    assert sum(bool(ENV_LINE.search(c)) for c in raw["setup_commands"]) == 1
    # One auth mode for the whole cluster: every ray start and the shells' environment say "disabled".
    for cmd in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert "RAY_AUTH_MODE=disabled ray start" in cmd, cmd
            assert "--num-gpus" not in cmd, "GPUs are left to Ray's detection"
    assert any("export RAY_AUTH_MODE=disabled" in c for c in raw["setup_commands"])

    key = tmp_path / "id_test"
    key.write_text("not a key\n")
    for workers in ([], ["10.0.0.11", "10.0.0.12"]):
        config = fill(raw, head_ip="10.0.0.10", worker_ips=workers, ssh_user="ubuntu", ssh_key=str(key),
                      env_dir="/opt/envs/hsic")
        prepared = prepare_config(config)
        validate_config(prepared)
        node_type = prepared["available_node_types"][prepared["head_node_type"]]
        assert node_type["min_workers"] == node_type["max_workers"] == len(workers)
        assert 'HSIC_RAY_ENV="/opt/envs/hsic"' in "\n".join(prepared["setup_commands"])
        assert prepared["head_start_ray_commands"] == raw["head_start_ray_commands"]


# ---------------------------------------------------------------------------------------------------------------
# End to end on this machine.


def run(cmd, *, timeout: float, cwd=None, env=None, log: Path | None = None, check: bool = True):
    """Run a command with a hard timeout; its output goes to `log` (and into the failure message)."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)
        out, rc = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        out, rc = out + f"\n[timed out after {timeout:.0f} s]", None
    if log is not None:
        log.write_text(out)
    if check and rc != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} -> {rc}\n{out[-6000:]}")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise


def gcs_port_open(port: int) -> bool:
    """Whether anything accepts connections on the port (`ray status` against a dead GCS takes 40 s to say no)."""
    with socket.socket() as s:
        s.settimeout(5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def ssh_control_dir(cluster_name: str) -> Path:
    """Where Ray's launcher keeps the ssh ControlMaster sockets of a cluster (command_runner.py)."""
    user_hash = hashlib.sha256(getpass.getuser().encode()).hexdigest()[:10]
    return Path(f"/tmp/ray_ssh_{user_hash}") / hashlib.sha256(cluster_name.encode()).hexdigest()[:10]


def pid_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def processes_in_namespace(ns: str) -> dict[int, str]:
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and pid_namespace(int(entry)) == ns:
            try:
                found[int(entry)] = Path(f"/proc/{entry}/comm").read_text().strip()
            except OSError:
                pass
    return found


RELAY = """\
# ssh ProxyCommand: relay stdin/stdout to 127.0.0.1:PORT (used when port 22 is taken).
import os, selectors, socket, sys
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
sel = selectors.DefaultSelector()
sel.register(0, selectors.EVENT_READ)
sel.register(sock, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        if key.fileobj == 0:
            data = os.read(0, 65536)
            if not data:
                sock.shutdown(socket.SHUT_WR)
                sel.unregister(0)
            else:
                sock.sendall(data)
        else:
            data = sock.recv(65536)
            if not data:
                sys.exit(0)
            os.write(1, data)
"""

NODE_BASHRC = """\
# ~/.bashrc of the test's node: like Debian's and Ubuntu's, it stops early for non-interactive shells, and
# puts no Python with Ray on PATH: cluster.yaml's setup_commands have to.
case $- in
    *i*) ;;
      *) return;;
esac
PS1='node$ '
"""


@pytest.fixture
def loopback_node(tmp_path):
    """sshd on 127.0.0.1 in its own PID and mount namespaces, with a private home and /tmp/ray; yields a
    dict describing it; stops it (and everything started in it) at the end."""
    missing = [f"{tool} (apt package {pkg})" for tool, pkg in SYSTEM_TOOLS.items()
               if not (shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists())]
    if missing:
        pytest.fail("the cluster launcher test needs " + ", ".join(missing) + ": install them with `apt-get install "
                    "-y --no-install-recommends openssh-server openssh-client rsync` (.ci/run does)")
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.fail("the cluster launcher test runs sshd in its own namespaces: it needs root and unshare (util-linux)")
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    user = getpass.getuser()
    real_home = Path(os.path.expanduser("~")).resolve()

    node = tmp_path / "node"
    home, raytmp = node / "home", node / "tmp-ray"
    for d in (home, raytmp):
        d.mkdir(parents=True)
    (home / ".bashrc").write_text(NODE_BASHRC)
    key, host_key = node / "id_ed25519", node / "host_ed25519"
    for k in (key, host_key):
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "hsic-ray-test", "-f", str(k)], timeout=30)
    authorized = node / "authorized_keys"
    authorized.write_text(Path(f"{key}.pub").read_text())
    authorized.chmod(0o600)

    port = 22 if port_is_free(22) else free_port()
    config = node / "sshd_config"
    config.write_text(textwrap.dedent(f"""\
        ListenAddress 127.0.0.1:{port}
        HostKey {host_key}
        PidFile {node}/sshd.pid
        AuthorizedKeysFile {authorized}
        AllowUsers {user}
        PubkeyAuthentication yes
        PasswordAuthentication no
        KbdInteractiveAuthentication no
        PermitRootLogin prohibit-password
        UsePAM no
        StrictModes no
        PrintMotd no
        MaxSessions 100
        MaxStartups 100
        Subsystem sftp internal-sftp
        """))
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    run([sshd, "-t", "-f", str(config)], timeout=30)

    # The Python that runs this test lives somewhere; if under the home directory (pyenv), the node's private
    # home keeps that part of the real one.
    keep = []
    base = Path(sys.base_prefix).resolve()
    if base.is_relative_to(real_home) and base != real_home:
        keep.append(base.relative_to(real_home).parts[0])
    binds = []
    for name in keep:
        (home / name).mkdir(exist_ok=True)
        binds.append(f"mount --bind {real_home / name} {home / name}")
    os.makedirs("/tmp/ray", exist_ok=True)
    init = " && ".join(binds + [f"mount --bind {raytmp} /tmp/ray", f"mount --rbind {home} {real_home}",
                                f"exec {sshd} -D -e -f {config}"])
    log = open(node / "sshd.log", "w")
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "--", "sh", "-c", init],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    ssh = ["ssh", "-i", str(key), "-p", str(port), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
           "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=5", f"{user}@127.0.0.1"]
    namespace = None
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"sshd (run in new PID and mount namespaces by unshare) exited with {proc.returncode}: "
                            f"{(node / 'sshd.log').read_text()[-3000:]}")
            try:
                r = subprocess.run(ssh + ["echo ok; cat /proc/1/comm; ls /proc | grep -c '^[0-9]'"], timeout=10,
                                   stdin=subprocess.DEVNULL, capture_output=True, text=True)
                if r.returncode == 0 and r.stdout.startswith("ok"):
                    break
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() > deadline:
                sshd_log = (node / "sshd.log").read_text()[-3000:]
                pytest.fail(f"sshd on 127.0.0.1:{port} did not accept the key: {sshd_log}")
            time.sleep(0.3)
        _, init_comm, nprocs = r.stdout.split()
        # The node sees its own processes only (sshd is its init): its `ray stop` cannot reach other clusters.
        assert init_comm == "sshd" and int(nprocs) < 20, r.stdout
        sshd_pid = psutil.Process(proc.pid).children()[0].pid  # unshare's child: sshd, pid 1 of the namespace
        namespace = pid_namespace(sshd_pid)
        assert namespace and namespace != pid_namespace(os.getpid())
        proxy = None
        if port != 22:  # the launcher's ssh always dials port 22: reach ours through a relay
            relay = node / "relay.py"
            relay.write_text(RELAY)
            proxy = f"{sys.executable} {relay} {port}"
        yield {"key": key, "user": user, "ssh": ssh, "proxy": proxy, "namespace": namespace}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # unshare, then (--kill-child) sshd, then the whole namespace
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
        log.close()
        if namespace:
            deadline = time.monotonic() + 20
            while processes_in_namespace(namespace) and time.monotonic() < deadline:
                time.sleep(0.2)
            left = processes_in_namespace(namespace)
            assert not left, f"processes of the test's node still running: {left}"


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_ray_up_submit_down_on_loopback(loopback_node, tmp_path):
    node = loopback_node
    name = f"hsic-ray-test-{uuid.uuid4().hex[:8]}"

    # The project as a user has it: a directory holding the package, the job and cluster.yaml (a snapshot, so
    # that the launcher does not hash or copy run directories, or files being edited while it copies).
    project = tmp_path / "project"
    project.mkdir()
    for item in PROJECT_FILES:
        src = REPO / item
        if src.is_dir():
            shutil.copytree(src, project / item, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, project / item)

    # The node's Python environment: a venv that sees this interpreter's packages (ray, torch), with a `ray`
    # command of its own, so that the cluster runs on the venv's python and hsic-ray is installed into it.
    env_dir = tmp_path / "env"
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(env_dir)], timeout=60)
    ray_script = env_dir / "bin" / "ray"
    ray_script.write_text(f"#!{env_dir}/bin/python\nimport sys\nfrom ray.scripts.scripts import main\n"
                          "sys.exit(main())\n")
    ray_script.chmod(0o755)

    gcs_port, client_port, dash_port, agent_port = (free_port() for _ in range(4))
    config = fill(load_cluster_yaml(), head_ip="127.0.0.1", worker_ips=[], ssh_user=node["user"],
                  ssh_key=str(node["key"]), env_dir=str(env_dir), cluster_name=name)
    if node["proxy"]:
        config["auth"]["ssh_proxy_command"] = node["proxy"]
    # Ports of our own, so that this cluster cannot collide with other Ray clusters running on this machine.
    config["head_start_ray_commands"] = [
        c.replace("--port=6379", f"--port={gcs_port} --ray-client-server-port={client_port} "
                                 f"--dashboard-port={dash_port} --dashboard-agent-listen-port={agent_port}")
        for c in config["head_start_ray_commands"]]
    assert any(f"--port={gcs_port}" in c for c in config["head_start_ray_commands"])
    config_file = project / "cluster.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))

    ray_cli = Path(sys.executable).parent / "ray"
    ray_cli = str(ray_cli) if ray_cli.exists() else shutil.which("ray")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    logs = tmp_path / "logs"
    logs.mkdir()
    launcher = [ray_cli]
    common = ["--log-style=record", "--log-color=false"]
    out_dir = tmp_path / "run"
    state_files = [Path("/tmp/ray") / f"cluster-{name}.{ext}" for ext in ("state", "lock")]
    started = time.monotonic()
    try:
        up = run(launcher + ["up", "-y", *common, "--no-config-cache", str(config_file)], cwd=project, env=env,
                 timeout=300, log=logs / "up.log")
        t_up = time.monotonic() - started
        # setup_commands installed the mounted copy into the node's environment (the node's ~ is private).
        assert f"hsic-ray from {Path.home()}/hsic-ray/hsic_ray/__init__.py" in up, up[-3000:]

        # `python` and `ray` of a plain, non-interactive, non-login ssh shell are the environment's.
        found = run(node["ssh"] + ["command -v python; command -v ray; echo auth=$RAY_AUTH_MODE"], timeout=30)
        assert found.split() == [f"{env_dir}/bin/python", f"{env_dir}/bin/ray", "auth=disabled"], found
        inside = processes_in_namespace(node["namespace"])
        assert {"gcs_server", "raylet"} <= set(inside.values()), inside
        # The head's own CLI agrees with the cluster on RAY_AUTH_MODE (a mismatch is an authentication error).
        status = run(launcher + ["exec", *common, "--no-config-cache", str(config_file), "ray status"], cwd=project,
                     env=env, timeout=120, log=logs / "status.log")
        assert "Node status" in status and "CPU" in status, status[-3000:]

        job = run(launcher + ["submit", *common, "--no-config-cache", str(config_file), "jobs/train_deep.py", "--",
                              "--trainer", "ray", "--preset", "paper_mlp", "--depth", "1", "--width", "64",
                              "--epochs", "1", "--max-steps", "10", "--format-epochs", "1", "--stages", "1",
                              "--output", str(out_dir)],
                  cwd=project, env=env, timeout=240, log=logs / "submit.log")
        metrics = json.loads((out_dir / "metrics.json").read_text())
        assert metrics["steps"] == 10, metrics
        assert 0.0 <= metrics["test_accuracy_formatted"] <= 100.0, metrics
        assert {"stages", "per_layer", "train_seconds"} <= set(metrics), sorted(metrics)
        assert metrics["stages"] == 1, metrics
        assert "connected to the Ray cluster running on this machine" in job, job[-3000:]  # the launcher's cluster
        assert gcs_port_open(gcs_port)
    finally:
        caches = set(Path(tempfile.gettempdir()).glob("ray-config-*"))
        down = run(launcher + ["down", "-y", *common, str(config_file)], cwd=project, env=env, timeout=120,
                   log=logs / "down.log", check=False)
        # What the launcher keeps on this side about the cluster: its state, the config `ray down` cached,
        # the ssh control sockets.
        for f in state_files:
            f.unlink(missing_ok=True)
        for f in set(Path(tempfile.gettempdir()).glob("ray-config-*")) - caches:
            if name in f.read_text(errors="replace"):
                f.unlink(missing_ok=True)
        shutil.rmtree(ssh_control_dir(name), ignore_errors=True)
    elapsed = time.monotonic() - started

    # `ray down` really stopped Ray on the head: its `ray stop` found `ray` (it only warns when it does not),
    # the head's Ray processes are gone and the GCS port is closed.
    assert re.search(r"Stopped all \d+ Ray processes", down), down[-3000:]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = {p: c for p, c in processes_in_namespace(node["namespace"]).items() if c not in ("sshd", "sshd-session")}
        if not left:
            break
        time.sleep(0.5)
    assert not left, f"Ray processes left on the head after `ray down`: {left}\n{down[-3000:]}"
    assert not gcs_port_open(gcs_port), "the cluster's GCS still accepts connections after `ray down`"
    print(f"ray up {t_up:.0f} s, up+submit+down {elapsed:.0f} s")
