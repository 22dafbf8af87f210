"""cluster.yaml: validated offline with Ray's launcher schema, and run end to end (`ray up`, `ray submit`,
`ray down`) on a cluster of three hosts made on this machine: a head and two workers, each a network namespace
with its own address on the test's own link, its own sshd, PID namespace, home directory and /tmp/ray.

- Network: a bridge in a fourth namespace, the client's (where `ray up`, `ray dashboard` and the other
  client commands run), and a veth pair from it to each host; nothing outside these namespaces is touched.
- PID namespace per host: `ray stop` (in `ray down`, and before each `ray start`) stops every Ray process it
  can see; each host sees only its own, never the other hosts' or the Ray clusters others run here.
- Home and /tmp/ray per host (and for the client), bind-mounted over the real ones in each host's mount
  namespace: ~/.bashrc, ~/hsic-ray, ~/.ray/auth_token and Ray's session files are each host's own, as on
  real machines, and the real ones are left alone. Everything else (the test's tmp dir, so the run's
  --output, and the Python install) is shared, as an NFS mount would be.
Stopping a host's sshd (its PID namespace's first process) kills whatever is left on that host.
"""

from __future__ import annotations

import copy
import getpass
import hashlib
import json
import os
import re
import shutil
import signal
import site
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
SYSTEM_TOOLS = {
    "sshd": "openssh-server",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "rsync": "rsync",
    "ip": "iproute2",
    "unshare": "util-linux",
}
TOKEN_MOUNT = "~/.ray/auth_token"


def load_cluster_yaml() -> dict:
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


def fill(
    config: dict,
    *,
    head_ip: str,
    worker_ips: list[str],
    ssh_user: str,
    ssh_key: str,
    env_dir: str | None = None,
    cluster_name: str | None = None,
) -> dict:
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
        assert len(hits) == 1, 'cluster.yaml: expected one setup command that sets HSIC_RAY_ENV="..."'
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
    # The project and the user's Ray token go to every node; the token is made private there.
    assert raw["file_mounts"] == {"~/hsic-ray": ".", TOKEN_MOUNT: TOKEN_MOUNT}
    setup = "\n".join(raw["setup_commands"])
    assert 'chmod 600 "$HOME/.ray/auth_token"' in setup
    assert any("pip install -e ~/hsic-ray" in c for c in raw["setup_commands"])
    assert sum(bool(ENV_LINE.search(c)) for c in raw["setup_commands"]) == 1
    # Token authentication on the whole cluster: every ray start and stop, and the nodes' shells.
    for cmd in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]:
        assert re.search(r"\bRAY_AUTH_MODE=token (\w+=\S* )*ray (start|stop)\b", cmd), cmd
        assert "disabled" not in cmd and "--dashboard-host" not in cmd, cmd  # dashboard: the head's localhost
        assert "--num-gpus" not in cmd, "GPUs are left to Ray's detection"
    assert "export RAY_AUTH_MODE=token" in setup and "disabled" not in setup
    # `ray down` stops only the head's Ray; each worker stops its own when the head's GCS port closes.
    assert any("/dev/tcp/$RAY_HEAD_IP/6379" in c and "ray stop" in c for c in raw["worker_start_ray_commands"])

    key = tmp_path / "id_test"
    key.write_text("not a key\n")
    for workers in ([], ["10.0.0.11", "10.0.0.12"]):
        config = fill(
            raw, head_ip="10.0.0.10", worker_ips=workers, ssh_user="ubuntu", ssh_key=str(key), env_dir="/opt/envs/hsic"
        )
        prepared = prepare_config(config)
        validate_config(prepared)
        node_type = prepared["available_node_types"][prepared["head_node_type"]]
        assert node_type["min_workers"] == node_type["max_workers"] == len(workers)
        assert 'HSIC_RAY_ENV="/opt/envs/hsic"' in "\n".join(prepared["setup_commands"])
        assert prepared["head_start_ray_commands"] == raw["head_start_ray_commands"]


# ---------------------------------------------------------------------------------------------------------------
# End to end: three hosts in network namespaces.

SUBNET = "10.250.0"  # the test's own link: these addresses exist only inside its namespaces
CLIENT_IP = f"{SUBNET}.1"
HOST_IPS = {"head": f"{SUBNET}.10", "worker1": f"{SUBNET}.11", "worker2": f"{SUBNET}.12"}

NODE_BASHRC = """\
# ~/.bashrc of a test host: like Debian's and Ubuntu's, it stops early for non-interactive shells, and puts
# no Python with Ray on PATH: cluster.yaml's setup_commands have to.
case $- in
    *i*) ;;
      *) return;;
esac
PS1='node$ '
"""

# The hosts have no route to a package index: pip installs hsic-ray from the packages already there (the
# venv sees this test's), without an isolated build environment to download: the build backend
# (pyproject.toml's build-system.requires) comes from this test's environment, which the test extra provides.
PIP_CONF = """\
[global]
no-index = true
disable-pip-version-check = true
[install]
no-build-isolation = false
"""


def run(
    cmd, *, timeout: float, cwd=None, env=None, log: Path | None = None, check: bool = True
) -> tuple[int | None, str]:
    """Run a command with a hard timeout; its output goes to `log` (and into the failure message)."""
    try:
        proc = subprocess.run(
            cmd,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
        out, rc = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        out, rc = out + f"\n[timed out after {timeout:.0f} s]", None
    if log is not None:
        log.write_text(out)
    if check and rc != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} -> {rc}\n{out[-6000:]}")
    return rc, out


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


def leftovers(ns: str) -> dict[int, str]:
    """A host's processes other than its sshd: Ray's, and any watcher cluster.yaml started."""
    return {p: c for p, c in processes_in_namespace(ns).items() if c not in ("sshd", "sshd-session")}


def own_site_dirs() -> list[str]:
    """The site-packages directories this test's interpreter imports from (its venv's, conda env's or system
    Python's, and the user's if enabled): what the hosts' environments must see."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [str(Path(d).resolve()) for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def private_home_script(home: Path, raytmp: Path, then: str) -> str:
    """Shell that mounts `home` over the real home directory and `raytmp` over /tmp/ray (in a new mount
    namespace), then runs `then`. The Python install and this test's environment (its interpreter, its
    site-packages), where under the real home (pyenv, a venv or conda env in ~), stay visible."""
    real_home = Path(os.path.expanduser("~")).resolve()
    binds = []
    for path in [sys.base_prefix, sys.prefix, *own_site_dirs()]:
        path = Path(path).resolve()
        if path.is_relative_to(real_home) and path != real_home:
            top = path.relative_to(real_home).parts[0]
            bind = f"mount --bind {real_home / top} {home / top}"
            if bind not in binds:
                (home / top).mkdir(exist_ok=True)
                binds.append(bind)
    os.makedirs("/tmp/ray", exist_ok=True)
    return " && ".join(binds + [f"mount --bind {raytmp} /tmp/ray", f"mount --rbind {home} {real_home}", then])


def make_host_env(env_dir: Path, real_home: Path) -> None:
    """A host's Python environment, where cluster.yaml's HSIC_RAY_ENV expects it ($HOME/hsic-ray-env): a venv
    on this interpreter's base Python that sees this test's own packages (ray, torch, pip, setuptools), with a
    `ray` command of its own, so that Ray runs on the venv's python and setup_commands install hsic-ray into
    it. `venv --system-site-packages` would not do: from a venv it sees the base interpreter's packages, not
    the venv's. A .pth file adds the test's site directories after the venv's own (site.addsitedir, so their
    .pth files count too): the host's editable hsic-ray, installed later into the venv, comes first."""
    run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], timeout=60)
    _, purelib = run(
        [str(env_dir / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], timeout=60
    )
    adds = "; ".join(f"site.addsitedir({d!r})" for d in own_site_dirs())
    (Path(purelib.strip()) / "zz-hsic-ray-test-site.pth").write_text(f"import site; {adds}\n")
    (env_dir / "bin" / "ray").write_text(
        f"#!{real_home}/hsic-ray-env/bin/python\nimport sys\nfrom ray.scripts.scripts import main\nsys.exit(main())\n"
    )
    (env_dir / "bin" / "ray").chmod(0o755)


class Hosts:
    """The test's namespaces: `client` (the user's machine) and the hosts of HOST_IPS."""

    def __init__(self, root: Path):
        tag = uuid.uuid4().hex[:6]
        self.root = root
        self.netns = {name: f"hsic-{tag}-{name}" for name in ["client", *HOST_IPS]}
        self.user = getpass.getuser()
        self.key = root / "id_ed25519"
        self.sshd: dict[str, subprocess.Popen] = {}
        self.pidns: dict[str, str] = {}
        self.client_home = root / "client" / "home"
        self._logs = []

    def home(self, host: str) -> Path:
        return self.root / host / "home"

    def client(self, cmd: list[str]) -> list[str]:
        """`cmd` run on the client: in its network namespace, with its own home and /tmp/ray."""
        script = private_home_script(self.client_home, self.root / "client" / "tmp-ray", 'exec "$@"')
        return [
            "ip",
            "netns",
            "exec",
            self.netns["client"],
            "unshare",
            "--mount",
            "--",
            "sh",
            "-c",
            script,
            "client",
            *map(str, cmd),
        ]

    def ssh(self, host: str, command: str) -> list[str]:
        return self.client(
            [
                "ssh",
                "-i",
                self.key,
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "LogLevel=ERROR",
                "-o",
                "ConnectTimeout=5",
                f"{self.user}@{HOST_IPS[host]}",
                command,
            ]
        )

    def link(self) -> None:
        """The bridge in the client's namespace, and a veth pair from it to each host's eth0."""

        def ip(ns, *args):
            run(["ip", "-n", self.netns[ns], *args], timeout=30)

        for ns in self.netns.values():
            run(["ip", "netns", "add", ns], timeout=30)
        ip("client", "link", "add", "br0", "type", "bridge")
        ip("client", "addr", "add", f"{CLIENT_IP}/24", "dev", "br0")
        for host, addr in HOST_IPS.items():
            ip("client", "link", "add", f"v-{host}", "type", "veth", "peer", "name", "eth0", "netns", self.netns[host])
            ip("client", "link", "set", f"v-{host}", "master", "br0", "up")
            ip(host, "addr", "add", f"{addr}/24", "dev", "eth0")
            ip(host, "link", "set", "eth0", "up")
            ip(host, "link", "set", "lo", "up")
            # A default route, so that Ray's own guess of the node's address (the source address of a route
            # out) finds eth0's, as on a machine with one network.
            ip(host, "route", "add", "default", "dev", "eth0")
        ip("client", "link", "set", "br0", "up")
        ip("client", "link", "set", "lo", "up")

    def start_sshd(self, host: str, host_key: Path, authorized: Path) -> None:
        node = self.root / host
        home, raytmp = node / "home", node / "tmp-ray"
        for d in (home / ".config" / "pip", raytmp):
            d.mkdir(parents=True)
        (home / ".bashrc").write_text(NODE_BASHRC)
        (home / ".config" / "pip" / "pip.conf").write_text(PIP_CONF)
        config = node / "sshd_config"
        config.write_text(
            textwrap.dedent(f"""\
            ListenAddress {HOST_IPS[host]}:22
            HostKey {host_key}
            PidFile {node}/sshd.pid
            AuthorizedKeysFile {authorized}
            AllowUsers {self.user}
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
            """)
        )
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        run([sshd, "-t", "-f", str(config)], timeout=30)
        log = open(node / "sshd.log", "w")
        self._logs.append(log)
        init = private_home_script(home, raytmp, f"exec {sshd} -D -e -f {config}")
        self.sshd[host] = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.netns[host],
                "unshare",
                "--pid",
                "--fork",
                "--mount-proc",
                "--kill-child",
                "--",
                "sh",
                "-c",
                init,
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_for_sshd(self, host: str) -> None:
        deadline = time.monotonic() + 30
        while True:
            if self.sshd[host].poll() is not None:
                pytest.fail(
                    f"{host}'s sshd exited with {self.sshd[host].returncode}: "
                    f"{(self.root / host / 'sshd.log').read_text()[-3000:]}"
                )
            rc, out = run(self.ssh(host, "echo ok; cat /proc/1/comm; hostname -I"), timeout=15, check=False)
            if rc == 0 and out.startswith("ok"):
                break
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{host}'s sshd on {HOST_IPS[host]} did not accept the key: {out[-2000:]}\n"
                    f"{(self.root / host / 'sshd.log').read_text()[-3000:]}"
                )
            time.sleep(0.3)
        _, init_comm, addr = out.split()
        # Each host sees its own processes only (sshd is its init) and has its one address.
        assert init_comm == "sshd" and addr == HOST_IPS[host], out
        sshd_pid = psutil.Process(self.sshd[host].pid).children()[0].pid  # unshare's child: the host's pid 1
        self.pidns[host] = pid_namespace(sshd_pid)
        assert self.pidns[host] and self.pidns[host] != pid_namespace(os.getpid())

    def close(self) -> list[str]:
        """Stop every host (and all left in it), delete the namespaces; returns what was left running."""
        problems = []
        for proc in self.sshd.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)  # unshare, then (--kill-child) sshd, then the whole host
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=15)
        for host, ns in self.pidns.items():
            deadline = time.monotonic() + 20
            while processes_in_namespace(ns) and time.monotonic() < deadline:
                time.sleep(0.2)
            if processes_in_namespace(ns):
                problems.append(f"processes of {host} still running: {processes_in_namespace(ns)}")
        for ns in self.netns.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # its veths go with it
        left = set(self.netns.values()) & set(
            subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        )
        if left:
            problems.append(f"network namespaces left: {sorted(left)}")
        for log in self._logs:
            log.close()
        return problems


@pytest.fixture
def hosts(tmp_path):
    """A client and three hosts (head, worker1, worker2), each with its sshd; all stopped and deleted at the
    end, whatever happened."""
    missing = [
        f"{tool} (apt package {pkg})"
        for tool, pkg in SYSTEM_TOOLS.items()
        if not (shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists())
    ]
    if missing:
        pytest.fail(
            "the cluster launcher test needs " + ", ".join(missing) + ": run the suite with "
            "`scripts/test.sh` as root, which installs them (apt-get)"
        )
    if os.geteuid() != 0:
        pytest.fail("the cluster launcher test makes network namespaces and runs sshd in them: it needs root")
    h = Hosts(tmp_path / "hosts")
    (h.client_home / ".ray").mkdir(parents=True)
    (h.root / "client" / "tmp-ray").mkdir()
    host_key = h.root / "host_ed25519"
    for k in (h.key, host_key):
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "hsic-ray-test", "-f", str(k)], timeout=30)
    authorized = h.root / "authorized_keys"
    authorized.write_text(Path(f"{h.key}.pub").read_text())
    authorized.chmod(0o600)
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    try:
        h.link()
        for host in HOST_IPS:
            h.start_sshd(host, host_key, authorized)
        for host in HOST_IPS:
            h.wait_for_sshd(host)
        yield h
    finally:
        problems = h.close()
    assert not problems, problems


def wait_for(what: str, check, timeout: float, interval: float = 1.0):
    """Poll `check()` until it returns something true; fail naming `what` (and the last value) otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; last seen: {value!r}")
        time.sleep(interval)


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written
    return records


def alive_nodes(status: str) -> int:
    """Number of active nodes in `ray status` output (" 1 node_<id>" lines, or " 3 <node type>")."""
    if "Active:" not in status:
        return 0
    active = status.split("Active:", 1)[1].split("Pending:", 1)[0]
    return sum(int(n) for n in re.findall(r"^\s*(\d+) \S+$", active, re.M))


def port_open(h: Hosts, addr: str, port: int) -> bool:
    probe = f"import socket; s = socket.socket(); s.settimeout(3); print(s.connect_ex(({addr!r}, {port})))"
    return run(h.client([sys.executable, "-c", probe]), timeout=30)[1].strip() == "0"


# The job: 3 layers on 3 stages spread over the nodes, long enough to lose a node in the middle. Ray places
# a SPREAD group's largest bundles first, each on a node of its own while there is one: with the coordinator's
# bundle (a reservation for the driver) smaller than a stage's, the 3 stages get the 3 nodes. Each host has
# 2 CPUs, so after one is lost the other two still hold 3.5 CPUs of bundles.
MAX_STEPS = 200
JOB = [
    "--trainer",
    "ray",
    "--preset",
    "paper_mlp",
    "--depth",
    "1",
    "--width",
    "128",
    "--epochs",
    "20",
    "--max-steps",
    str(MAX_STEPS),
    "--checkpoint-every",
    "10",
    "--log-every",
    "5",
    "--format-epochs",
    "1",
    "--stages",
    "3",
    "--strategy",
    "SPREAD",
    "ray.coordinator_cpus=0.5",
]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_up_submit_lose_a_node_down_on_three_hosts(hosts, tmp_path):
    h = hosts
    name = f"hsic-ray-test-{uuid.uuid4().hex[:8]}"
    real_home = Path(os.path.expanduser("~")).resolve()

    # The project as a user has it (a snapshot, so that the launcher does not hash or copy run directories, or
    # files being edited while it copies).
    project = tmp_path / "project"
    project.mkdir()
    for item in PROJECT_FILES:
        src = REPO / item
        if src.is_dir():
            shutil.copytree(src, project / item, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, project / item)
    for host in HOST_IPS:
        make_host_env(h.home(host) / "hsic-ray-env", real_home)

    ray_cli = Path(sys.executable).parent / "ray"
    ray_cli = str(ray_cli) if ray_cli.exists() else shutil.which("ray")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    token_env = {**env, "RAY_AUTH_MODE": "token"}  # the README's client shell
    logs = tmp_path / "logs"
    logs.mkdir()
    common = ["--log-style=record", "--log-color=false"]

    # The user's token, generated once on their machine.
    run(h.client([ray_cli, "get-auth-token", "--generate"]), env=env, timeout=60)
    token = (h.client_home / ".ray" / "auth_token").read_text().strip()
    assert len(token) >= 32, token

    config = fill(
        load_cluster_yaml(),
        head_ip=HOST_IPS["head"],
        worker_ips=[HOST_IPS["worker1"], HOST_IPS["worker2"]],
        ssh_user=h.user,
        ssh_key=str(h.key),
        cluster_name=name,
    )
    config_file = project / "cluster.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    launcher = [ray_cli]

    out_dir = tmp_path / "run"
    dashboard = job = job_log = None
    started = time.monotonic()
    try:
        _, up = run(
            h.client(launcher + ["up", "-y", *common, "--no-config-cache", config_file]),
            cwd=project,
            env=env,
            timeout=300,
            log=logs / "up.log",
        )
        t_up = time.monotonic() - started
        # setup_commands installed the head's own copy of the project (~ is each host's own).
        assert f"hsic-ray from {real_home}/hsic-ray/hsic_ray/__init__.py" in up, up[-3000:]
        # The head's autoscaler sets up the workers over ssh: wait until all three nodes have joined.
        status_cmd = h.ssh("head", "ray status")
        wait_for(
            "3 nodes in `ray status` on the head",
            lambda: alive_nodes(run(status_cmd, timeout=60, check=False)[1]) == 3,
            timeout=300,
            interval=3,
        )
        t_nodes = time.monotonic() - started

        for host in HOST_IPS:
            # A plain (non-interactive) ssh shell has the environment's python and ray and token mode; the token
            # arrived, private to the ssh user; Ray runs there.
            _, found = run(
                h.ssh(
                    host,
                    "command -v python; command -v ray; echo $RAY_AUTH_MODE; "
                    "stat -c %a ~/.ray/auth_token; cat ~/.ray/auth_token",
                ),
                timeout=30,
            )
            assert found.split() == [
                f"{real_home}/hsic-ray-env/bin/python",
                f"{real_home}/hsic-ray-env/bin/ray",
                "token",
                "600",
                token,
            ], (host, found)
            wanted = {"gcs_server", "raylet"} if host == "head" else {"raylet"}
            assert wanted <= set(processes_in_namespace(h.pidns[host]).values()), host

        # Token authentication, seen from the client's machine on the cluster's network. The GCS: refused
        # without the token (a wrong one, or none with the old RAY_AUTH_MODE=disabled), served with it.
        gcs = f"{HOST_IPS['head']}:6379"
        for label, client_env in [
            ("a wrong token", {**token_env, "RAY_AUTH_TOKEN": "0" * 32}),
            ("no token", {**env, "RAY_AUTH_MODE": "disabled"}),
        ]:
            rc, out = run(h.client([ray_cli, "status", "--address", gcs]), env=client_env, timeout=120, check=False)
            assert rc != 0 and "auth" in out.lower(), f"`ray status` with {label} was not refused: {out[-2000:]}"
        _, out = run(h.client([ray_cli, "status", "--address", gcs]), env=token_env, timeout=120)
        assert alive_nodes(out) == 3, out
        # The dashboard (and its job API) listens on the head's localhost only; `ray dashboard cluster.yaml`
        # tunnels it to the client, where `ray job submit` needs the token as well.
        assert not port_open(h, HOST_IPS["head"], 8265), "the dashboard is reachable from the network"
        dashboard = subprocess.Popen(
            h.client(launcher + ["dashboard", "--no-config-cache", config_file]),
            cwd=project,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=open(logs / "dashboard.log", "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        def forwarded():
            assert dashboard.poll() is None, f"ray dashboard ended: {(logs / 'dashboard.log').read_text()[-3000:]}"
            return port_open(h, "127.0.0.1", 8265)

        wait_for("`ray dashboard` to forward port 8265", forwarded, timeout=60)
        submit = [ray_cli, "job", "submit", "--address", "http://127.0.0.1:8265", "--", "echo", "served-by-the-head"]
        for label, client_env in [
            ("a wrong token", {**token_env, "RAY_AUTH_TOKEN": "0" * 32}),
            ("no token", {**env, "RAY_AUTH_MODE": "disabled"}),
        ]:
            rc, out = run(h.client(submit), env=client_env, timeout=120, check=False)
            assert rc != 0 and "served-by-the-head" not in out and "auth" in out.lower(), (
                f"`ray job submit` with {label} was not refused: {out[-2000:]}"
            )
        _, out = run(h.client(submit), env=token_env, timeout=120, log=logs / "job-submit.log")
        assert "served-by-the-head" in out and "succeeded" in out, out[-3000:]
        t_auth = time.monotonic() - started

        # The training job, through `ray submit`; a worker host loses Ray in the middle of the run.
        job_log = open(logs / "submit.log", "w")
        job = subprocess.Popen(
            h.client(
                launcher
                + [
                    "submit",
                    *common,
                    "--no-config-cache",
                    config_file,
                    "jobs/train_deep.py",
                    "--",
                    *JOB,
                    "--output",
                    out_dir,
                ]
            ),
            cwd=project,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=job_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        def progress():
            assert job.poll() is None, f"the job ended early:\n{(logs / 'submit.log').read_text()[-4000:]}"
            steps = [r["step"] for r in read_jsonl(out_dir / "metrics.jsonl") if r.get("kind") == "step"]
            return (out_dir / "placements.json").exists() and steps and max(steps) >= 15

        wait_for("the job's step 15 (after its first checkpoint)", progress, timeout=240)
        placements = json.loads((out_dir / "placements.json").read_text())
        nodes = [p["node_ip"] for p in placements]
        assert sorted(nodes) == sorted(HOST_IPS.values()), f"SPREAD put the 3 stages on {nodes}"
        victim = "worker1"
        lost = [s for s, ip in enumerate(nodes) if ip == HOST_IPS[victim]]
        run(h.ssh(victim, "ray stop --force"), timeout=60, log=logs / "kill.log")  # SIGKILL: as if the node died
        t_kill = time.monotonic() - started
        rc = job.wait(timeout=400)
        submitted = (logs / "submit.log").read_text()
        assert rc == 0, f"ray submit -> {rc}\n{submitted[-6000:]}"

        metrics = json.loads((out_dir / "metrics.json").read_text())
        assert metrics["steps"] == MAX_STEPS and metrics["stages"] == 3, metrics
        assert 0.0 <= metrics["test_accuracy_formatted"] <= 100.0, metrics
        recoveries = [r for r in read_jsonl(out_dir / "metrics.jsonl") if r.get("kind") == "recovery"]
        survivors = {HOST_IPS["head"], HOST_IPS["worker2"]}
        assert recoveries and {r["stage"] for r in recoveries} == set(lost), (lost, recoveries)
        assert all(r["node_ip"] in survivors and r["restored_from_step"] for r in recoveries), recoveries
        assert metrics["recoveries"] == len(recoveries), metrics
        now = [p["node_ip"] for p in json.loads((out_dir / "placements.json").read_text())]
        assert HOST_IPS[victim] not in now, f"stages still placed on the lost node: {now}"
        assert "connected to the Ray cluster running on this machine" in submitted, submitted[-3000:]
        t_job = time.monotonic() - started
    finally:
        for proc in (dashboard, job):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
        if job_log is not None:
            job_log.close()
        caches = set(Path(tempfile.gettempdir()).glob("ray-config-*"))
        _, down = run(
            h.client(launcher + ["down", "-y", *common, config_file]),
            cwd=project,
            env=env,
            timeout=120,
            log=logs / "down.log",
            check=False,
        )
        # What the launcher keeps on the client's side (its /tmp/ray is the test's): the config `ray down`
        # cached, the ssh control sockets.
        for f in set(Path(tempfile.gettempdir()).glob("ray-config-*")) - caches:
            if name in f.read_text(errors="replace"):
                f.unlink(missing_ok=True)
        shutil.rmtree(ssh_control_dir(name), ignore_errors=True)
    t_down0 = time.monotonic()

    # `ray down` stopped Ray on every host: its `ray stop` found `ray` on the head, and no Ray process is left.
    assert re.search(r"Stopped (all|only) \d+ ", down), down[-3000:]
    # The workers' Ray stops once the head's has (cluster.yaml's watcher): nothing is left on any host.
    deadline = time.monotonic() + 90
    while left := {host: leftovers(h.pidns[host]) for host in HOST_IPS if leftovers(h.pidns[host])}:
        assert time.monotonic() < deadline, f"processes left 90 s after `ray down`: {left}\n{down[-3000:]}"
        time.sleep(1)
    t_down = time.monotonic() - t_down0
    print(
        f"ray up {t_up:.0f} s, 3 nodes {t_nodes:.0f} s, auth checks {t_auth:.0f} s, kill at {t_kill:.0f} s, "
        f"job done {t_job:.0f} s; nothing left on the hosts {t_down:.0f} s after `ray down`"
    )
