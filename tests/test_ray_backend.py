"""`peftbench run --backend ray` on a real Ray cluster that the tests start themselves.

Every byte of the tests' traffic stays on loopback: the head is pinned to 127.0.0.1 (with
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, else Ray swaps in the machine's routable address, in the
head and in the driver alike); a second node lives only in network namespaces made here.

Nothing here reads or writes the machine's Ray state (~/.ray, /tmp/ray, $RAY_ADDRESS): every Ray
process runs with a HOME and RAY_TMPDIR of the module's own and its auth settings given
explicitly. That sandbox starts out holding what a local run of an earlier peftbench left behind
(a token in ~/.ray, a stale session and a recorded address in the temp dir), so every cluster
test also proves that such leftovers change nothing."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from bench.run import suite
from test_runner import RUNNING, load_all, make_suite, result_files, run_cli, wait_for

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# Ray adds 15 to its workers' niceness; here they stay as nice as the test that started the node.
NICE = {"RAY_worker_niceness": "0"}
# A dead worker node is noticed in about a second, not half a minute.
FAST_HEALTH = {"RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "3"}
# The test cluster's token, given to its nodes and drivers explicitly; never written to a file.
TOKEN = secrets.token_hex(32)
CLUSTER_AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN}
RAY_STATE = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_TMPDIR")


def free_port() -> int:
    """A loopback port that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plant_leftovers(home: Path) -> None:
    """What a local `--backend ray` run of an earlier peftbench (plain `ray.init()`) and a
    `ray start` leave behind: a token Ray then turns auth on with, a session that is no longer
    running, and the address the default `ray.init()` would join."""
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    ray_tmp = home / "tmp" / "ray"
    session = ray_tmp / "session_2000-01-01_00-00-00_000000_1"
    (session / "sockets").mkdir(parents=True)
    dead = free_port()
    (session / f"gcs_server_port_{'0' * 56}").write_text(str(dead))
    (ray_tmp / "session_latest").symlink_to(session)
    (ray_tmp / "ray_current_cluster").write_text(f"127.0.0.1:{dead}")


def snapshot(home: Path) -> dict[str, str]:
    """Every Ray file under the sandbox (the data caches live elsewhere), with its content."""
    return {
        str(p.relative_to(home)): p.read_text() if p.is_file() else ("-> " + os.readlink(p) if p.is_symlink() else "dir")
        for p in sorted([*(home / ".ray").rglob("*"), *(home / "tmp").rglob("*")])
    }


@pytest.fixture(scope="module")
def sandbox():
    """A HOME (and RAY_TMPDIR under it) of the module's own, holding an earlier run's leftovers."""
    home = Path(tempfile.mkdtemp(prefix="pbh-", dir="/tmp"))
    plant_leftovers(home)
    yield home
    shutil.rmtree(home, ignore_errors=True)


def isolated(home: Path, **extra: str | None) -> dict[str, str]:
    """The environment of a Ray process here: the machine's Ray state out of reach, the data and
    model caches still the machine's (they hold no Ray state, and rebuilding them costs time);
    an `extra` of None unsets that variable."""
    env = {k: v for k, v in os.environ.items() if k not in RAY_STATE}
    real_home = Path.home()
    env.setdefault("PEFTBENCH_CACHE", str(real_home / ".cache" / "peftbench"))
    env.setdefault("HF_HOME", str(real_home / ".cache" / "huggingface"))
    env.update(HOME=str(home), RAY_TMPDIR=str(home / "tmp"), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.update({k: v for k, v in extra.items() if v is not None})
    return {k: v for k, v in env.items() if extra.get(k, "") is not None}


@pytest.fixture(autouse=True)
def _no_orphans():
    yield
    while RUNNING:
        proc = RUNNING.pop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver leads its own session
            proc.wait()


class Node:
    """`ray start --block` as a child process in its own session, with its own temp dir and a
    bounded object store; stopped by its process group, which only it and its children are in."""

    def __init__(self, ip: str, env: dict[str, str], head: str | None = None, cpus: int = 2, netns: str | None = None):
        # Short: Ray's unix sockets live under it, and their paths must stay under 108 bytes.
        self.temp = Path(tempfile.mkdtemp(prefix="pbray-", dir="/tmp"))
        ray = Path(sys.executable).with_name("ray")
        cmd = [
            str(ray),
            "start",
            "--block",
            f"--node-ip-address={ip}",
            f"--temp-dir={self.temp}",
            f"--num-cpus={cpus}",
            "--num-gpus=0",
            "--object-store-memory=80000000",
            "--disable-usage-stats",
        ]
        cmd += ["--head", "--port=0", "--include-dashboard=false"] if head is None else [f"--address={head}"]
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        self.log = open(self.temp / "start.log", "w")
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if head is None:
            marker = self.temp / "ray_current_cluster"
            try:
                wait_for(lambda: marker.exists() and marker.read_text().strip() or self.proc.poll() is not None, timeout=120)
            except TimeoutError:
                self.stop()
                raise
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"ray head did not start: {(self.temp / 'start.log').read_text()[-2000:]}")
            self.address = marker.read_text().strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # ray start --block stops its node on SIGTERM
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever of the node outlived it
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.log.close()
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def head(sandbox):
    pytest.importorskip("ray")
    node = Node("127.0.0.1", isolated(sandbox, **CLUSTER_AUTH, **LOOPBACK, **FAST_HEALTH, **NICE))
    yield node
    node.stop()


def start(cmd: list[str], env: dict[str, str], netns: str | None = None, stderr=subprocess.STDOUT) -> subprocess.Popen:
    """A driver, as test_runner.run_cli starts the local runner; in `netns` if given."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns, *cmd] if netns else cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        start_new_session=True,
    )
    RUNNING.append(proc)
    return proc


def ray_cli(*args: str, home: Path, address: str | None, netns: str | None = None, stderr=subprocess.STDOUT, **env: str | None):
    """`peftbench run ... --backend ray` with the test cluster's token, unless `env` says otherwise
    (None: unset)."""
    cmd = [sys.executable, "-m", "bench.cli", "run", *args, "--no-progress", "--backend", "ray"]
    cmd += ["--address", address] if address else []
    return start(cmd, isolated(home, **{**CLUSTER_AUTH, **({} if netns else LOOPBACK), **env}), netns, stderr)


def descendants(pid: int) -> set[int]:
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            pass
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False


def children(pid: int) -> set[int]:
    return {c for c in descendants(pid) if parent_of(c) == pid}


def parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def kill_mid_trial(worker: int, trial_id: str, directory: Path) -> set[int]:
    """SIGKILL a Ray worker while the trial it supervises still runs, and return the processes
    under it. The worker and everything under it are stopped first, so the trial cannot end
    between the check and the kill: the check finds the trial's process (the worker's child is
    the fork server, its child the trial) alive, hence the worker has not returned the task and
    the kill costs this attempt. A trial that already ended is reported as such, never counted
    as killed: the result it returned would be no retry."""
    os.kill(worker, signal.SIGSTOP)
    tree: set[int] = set()
    while new := descendants(worker) - tree:  # anything forked just before the stop is caught by the next pass
        for pid in new:
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        tree |= new
    trials = {t for server in children(worker) for t in children(server) if alive(t)}
    published = (directory / f"{trial_id}.json").exists()
    os.kill(worker, signal.SIGKILL)
    for pid in tree:  # stopped, they could not notice that their worker died
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert trials and not published, f"trial {trial_id} ended before its worker {worker} was killed: not a retry"
    return tree


def test_smoke_suite_on_ray_gives_the_local_successes(head, sandbox, tmp_path):
    smoke = REPO / "suites" / "smoke.toml"
    local = run_cli(str(smoke), "--results", str(tmp_path / "local"))
    out_local, _ = local.communicate(timeout=900)
    assert local.returncode == 0, out_local
    proc = ray_cli(str(smoke), "--results", str(tmp_path / "ray"), home=sandbox, address=head.address)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out
    on_local, on_ray = load_all(tmp_path / "local" / "smoke"), load_all(tmp_path / "ray" / "smoke")
    ok = lambda found: {i for i, r in found.items() if r["status"] == "success"}  # noqa: E731
    assert len(ok(on_local)) == 11 and ok(on_ray) == ok(on_local)
    assert all(r["env"]["ray"]["node_ip"] == "127.0.0.1" for r in on_ray.values())
    for trial_id, r in on_ray.items():  # the same trial, measured in a process of its own
        assert r["train"]["steps"] == on_local[trial_id]["train"]["steps"]
        assert r["memory"]["peak_source"] == "rss" and r["memory"]["peak_bytes"] > 0
        if r.get("adapter_dir"):
            assert Path(r["adapter_dir"]).parent == tmp_path / "ray" / "smoke" / "adapters"
            assert sorted(p.name for p in Path(r["adapter_dir"]).iterdir()) == sorted(
                p.name for p in Path(on_local[trial_id]["adapter_dir"]).iterdir()
            )
    # Resume: the same skip rule as local runs, and no cluster needed to skip.
    proc = ray_cli(str(smoke), "--results", str(tmp_path / "ray"), home=sandbox, address=head.address)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "ran 0, skipped 11" in out, out


RETRY_SUITE = """
name = "{name}"
[model]
name = "synthetic:llama-tiny"
[data]
task = "sst2"
train_examples = 16
max_length = 32
[train]
lr = 1e-3
batch_size = 4
max_steps = {steps}
[eval]
tasks = []
[run]
timeout = 600
threads = 1
[[sweep]]
method = "lora"
config = {{ r = 2, alpha = 4 }}
[[sweep]]
method = "lora"
config = {{ r = 4, alpha = 8 }}
run = {{ retries = 1 }}
[[sweep]]
method = "frozen"
"""


def test_killed_ray_worker_is_recorded_or_retried_and_rerun_completes(head, sandbox, tmp_path):
    path = tmp_path / "kill.toml"
    path.write_text(RETRY_SUITE.format(name="kill", steps=100))
    directory = tmp_path / "r" / "kill"
    proc = ray_cli(str(path), "--results", str(tmp_path / "r"), home=sandbox, address=head.address)
    lora = {t.id for t in suite.load(path).trials if t.spec["method"]["name"] == "lora"}
    killed: dict[str, tuple[int, set[int]]] = {}
    # Kill each LoRA trial's Ray worker once, while its trial provably runs: the frozen trial and the retry run on.
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        running = directory / ".running"
        for trial_id, pid, node_ip in [line.split() for line in running.read_text().splitlines()] if running.exists() else []:
            if trial_id in lora and trial_id not in killed:
                assert node_ip == "127.0.0.1"
                killed[trial_id] = (int(pid), kill_mid_trial(int(pid), trial_id, directory))
        time.sleep(0.1)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    for _, tree in killed.values():  # the trial's process died with its Ray worker
        wait_for(lambda: not any(alive(c) for c in tree), timeout=30)
    found = load_all(directory)
    assert len(found) == 3, out
    by_rank = {r["spec"]["method"]["config"].get("r"): r for r in found.values()}
    failed, retried = by_rank[2], by_rank[4]
    assert failed["status"] == "failed" and "after 0 retries" in failed["error"], failed["error"]
    assert sorted(killed) == sorted(lora), out
    # The success comes from a second attempt, in another worker than the one killed mid-trial.
    assert retried["status"] == "success" and retried["env"]["ray"]["worker_pid"] != killed[retried["trial_id"]][0]
    assert by_rank[None]["status"] == "success"
    assert not list(directory.glob(".*.tmp")) and not list(directory.glob(".*draft*"))
    mtimes = {p.stem: p.stat().st_mtime_ns for p in result_files(directory) if p.stem != failed["trial_id"]}

    proc = ray_cli(str(path), "--results", str(tmp_path / "r"), home=sandbox, address=head.address)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "ran 1, skipped 2" in out, out
    after = load_all(directory)
    assert sorted(after) == sorted(found) and all(r["status"] == "success" for r in after.values())
    for trial_id, mtime in mtimes.items():
        assert (directory / f"{trial_id}.json").stat().st_mtime_ns == mtime
    # One whole adapter per trained trial, nothing half-written beside them.
    adapters = directory / "adapters"
    assert sorted(p.name for p in adapters.iterdir()) == sorted(i for i, r in after.items() if r["params"]["trainable"])
    for trial_id in (p.name for p in adapters.iterdir()):
        assert Path(after[trial_id]["adapter_dir"]) == adapters / trial_id and any((adapters / trial_id).iterdir())
    assert not list(directory.glob(".*.tmp")) and not list(directory.glob(".*draft*"))


def ray_processes(marker: str) -> list[int]:
    """Processes whose command line names `marker` (a Ray temp dir is on every one of its node's)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker in cmdline.read_bytes().decode(errors="replace") and alive(int(cmdline.parent.name)):
                found.append(int(cmdline.parent.name))
        except OSError:
            pass
    return found


def error_line(proc: subprocess.Popen) -> str:
    """The driver's whole stderr, which must be one line, and its exit code 2."""
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, out + err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in out + err, out + err
    print(err.strip())  # the exact line, for the record (pytest -s)
    return err


def cli_error(capsys, *args: str) -> str:
    """`peftbench run ARGS --backend ray` in this process: exit code 2 and one line on stderr."""
    from bench import cli

    assert cli.main(["run", *args, "--no-progress", "--backend", "ray"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    print(err.strip(), file=sys.__stdout__)  # the exact line, for the record (pytest -s)
    return err


def test_local_run_owns_its_cluster_and_leaves_nothing_behind(sandbox, tmp_path, capsys):
    """No --address: a cluster of the run's own, on loopback, in its own temp dir; the sandbox's
    leftovers (a token that plain Ray would turn auth on with, a recorded address that plain
    `ray.init()` would join and fail on) are neither used nor changed, and nothing is added."""
    pytest.importorskip("ray")
    before = snapshot(sandbox)
    path = make_suite(tmp_path, name="own")
    path.write_text(re.sub(r"(?m)^grid\.rank = .*$", "config = { r = 2, alpha = 4 }", path.read_text()))  # two trials: lora, frozen
    proc = ray_cli(str(path), "--results", str(tmp_path / "r"), home=sandbox, address=None, RAY_AUTH_MODE=None, RAY_AUTH_TOKEN=None)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    found = load_all(tmp_path / "r" / "own")
    assert len(found) == 2 and all(r["status"] == "success" for r in found.values()), out
    assert {r["env"]["ray"]["node_ip"] for r in found.values()} == {"127.0.0.1"}  # pinned by the backend, not by the test
    line = next(x for x in out.splitlines() if x.startswith("ray: a local cluster of this run's own at "))
    address, temp = line.split(" at ", 1)[1].split()[0], line.split("(temp dir ", 1)[1].split(")")[0]
    assert address.startswith("127.0.0.1:") and Path(temp).name.startswith("pbray-")
    assert not Path(temp).exists() and snapshot(sandbox) == before
    wait_for(lambda: not ray_processes(temp), timeout=30)
    # The cluster is gone: its address is a dead session now, and says so in one line.
    err = cli_error(capsys, str(path), "--results", str(tmp_path / "r2"), "--address", address)
    assert f"no Ray cluster at {address} (--address): nothing answers there (Connection refused)" in err
    assert not result_files(tmp_path / "r2" / "own")


def test_an_address_without_a_cluster_is_one_error_line(tmp_path, monkeypatch, capsys):
    for key in RAY_STATE:
        monkeypatch.delenv(key, raising=False)
    path = make_suite(tmp_path, name="no")
    args = (str(path), "--results", str(tmp_path / "r"))
    nothing = f"127.0.0.1:{free_port()}"
    err = cli_error(capsys, *args, "--address", nothing)
    assert f"no Ray cluster at {nothing} (--address): nothing answers there (Connection refused)" in err
    monkeypatch.setenv("RAY_ADDRESS", nothing)  # an explicit choice too, and named as the source
    assert f"no Ray cluster at {nothing} ($RAY_ADDRESS)" in cli_error(capsys, *args)
    err = cli_error(capsys, *args, "--address", "auto")
    assert "--address 'auto': expected the cluster's GCS address, host:port" in err
    assert not result_files(tmp_path / "r" / "no")


VERSION_MISMATCH = "import sys, ray; ray.__version__ = '0.0.0-other'; from bench.cli import main; sys.exit(main(sys.argv[1:]))"


def test_a_cluster_that_refuses_the_driver_is_one_error_line(head, sandbox, tmp_path):
    path = make_suite(tmp_path, name="no")
    args = (str(path), "--results", str(tmp_path / "r"))
    # Ray would retry a refused token for 20 s; two attempts show the same refusal.
    quick = {"RAY_gcs_server_port_wait_time_s": "2", "stderr": subprocess.PIPE}
    err = error_line(ray_cli(*args, home=sandbox, address=head.address, RAY_AUTH_TOKEN=secrets.token_hex(32), **quick))
    assert f"the Ray cluster at {head.address} (--address) refused this driver: it sent a token that is not the cluster's" in err
    # The issue's own case: no auth settings, an old token in ~/.ray (which Ray ignores for an explicit address).
    err = error_line(ray_cli(*args, home=sandbox, address=head.address, RAY_AUTH_MODE=None, RAY_AUTH_TOKEN=None, **quick))
    assert "refused this driver: it sent no token (RAY_AUTH_MODE is unset)" in err
    cmd = [sys.executable, "-c", VERSION_MISMATCH, "run", *args, "--no-progress", "--backend", "ray", "--address", head.address]
    err = error_line(start(cmd, isolated(sandbox, **CLUSTER_AUTH, **LOOPBACK), stderr=subprocess.PIPE))
    assert f"cannot join the Ray cluster at {head.address} (--address): Version mismatch" in err and "Ray: 0.0.0-other" in err
    assert not result_files(tmp_path / "r" / "no")


def test_without_ray_the_message_says_how_to_install(tmp_path, monkeypatch, capsys):
    from bench import cli

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    path = make_suite(tmp_path)
    assert cli.main(["run", str(path), "--results", str(tmp_path / "r"), "--backend", "ray"]) == 2
    err = capsys.readouterr().err
    assert "--backend ray needs Ray" in err and "pip install 'peftbench[ray]'" in err
    assert not (tmp_path / "r").exists()  # nothing ran, nothing was written
    # The local backend never imports Ray.
    assert cli.main(["run", str(path), "--address", "127.0.0.1:1"]) == 2
    assert "needs --backend ray" in capsys.readouterr().err


def test_bad_ray_resources_name_the_field(tmp_path):
    path = make_suite(tmp_path)
    path.write_text(path.read_text().replace("threads = 1", "threads = 1\ngpus = -1"))
    with pytest.raises(suite.SuiteError, match=r"run\.gpus.*must be >= 0"):
        suite.load(path)
    path.write_text(path.read_text().replace("gpus = -1", "retries = 1.5"))
    with pytest.raises(suite.SuiteError, match=r"run\.retries.*expected int"):
        suite.load(path)


@pytest.fixture
def namespaces():
    """Two network namespaces joined by a veth pair, 10.241.0.1 <-> 10.241.0.2: a second Ray node
    whose traffic never leaves this machine's own namespaces. Skips where they cannot be made."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to make network namespaces")
    tag = uuid.uuid4().hex[:6]
    a, b = f"pb-{tag}-a", f"pb-{tag}-b"
    made = []
    try:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
            made.append(ns)
        for cmd in (
            ["link", "add", f"pb{tag}a", "netns", a, "type", "veth", "peer", "name", f"pb{tag}b", "netns", b],
            ["-n", a, "addr", "add", "10.241.0.1/30", "dev", f"pb{tag}a"],
            ["-n", b, "addr", "add", "10.241.0.2/30", "dev", f"pb{tag}b"],
            ["-n", a, "link", "set", f"pb{tag}a", "up"],
            ["-n", b, "link", "set", f"pb{tag}b", "up"],
            ["-n", a, "link", "set", "lo", "up"],
            ["-n", b, "link", "set", "lo", "up"],
        ):
            subprocess.run(["ip", *cmd], check=True, capture_output=True)
    except (subprocess.CalledProcessError, OSError) as exc:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        pytest.skip(f"cannot make network namespaces here: {getattr(exc, 'stderr', b'').decode(errors='replace').strip() or exc}")
    yield a, b
    for ns in made:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_second_node_in_network_namespaces_shares_the_sweep(namespaces, sandbox, tmp_path):
    pytest.importorskip("ray")
    a, b = namespaces
    head = Node("10.241.0.1", isolated(sandbox, **CLUSTER_AUTH, **FAST_HEALTH, **NICE), cpus=1, netns=a)
    try:
        worker = Node("10.241.0.2", isolated(sandbox, **CLUSTER_AUTH, **FAST_HEALTH, **NICE), head=head.address, cpus=1, netns=b)
        try:
            wait_for(
                lambda: "Ray runtime started" in (worker.temp / "start.log").read_text() or worker.proc.poll() is not None, timeout=120
            )
            assert worker.proc.poll() is None, (worker.temp / "start.log").read_text()[-2000:]
            path = make_suite(tmp_path, name="two")
            proc = ray_cli(str(path), "--results", str(tmp_path / "r"), home=sandbox, address=head.address, netns=a)
            out, _ = proc.communicate(timeout=600)
            assert proc.returncode == 0, out
        finally:
            worker.stop()
    finally:
        head.stop()
    found = load_all(tmp_path / "r" / "two")
    assert len(found) == 4 and all(r["status"] == "success" for r in found.values()), out
    assert {r["env"]["ray"]["node_ip"] for r in found.values()} == {"10.241.0.1", "10.241.0.2"}
