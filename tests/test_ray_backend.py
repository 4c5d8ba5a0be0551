"""`peftbench run --backend ray` on a real Ray cluster that the tests start themselves.

Every byte of the tests' traffic stays on loopback: the head is pinned to 127.0.0.1 (with
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, else Ray swaps in the machine's routable address, in the
head and in the driver alike); a second node lives only in network namespaces made here."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from bench import suite
from test_runner import RUNNING, load_all, make_suite, result_files, run_cli, wait_for

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# Ray adds 15 to its workers' niceness; here they stay as nice as the test that started the node.
NICE = {"RAY_worker_niceness": "0"}
# A dead worker node is noticed in about a second, not half a minute.
FAST_HEALTH = {"RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "3"}


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

    def __init__(self, ip: str, head: str | None = None, cpus: int = 2, netns: str | None = None, env: dict | None = None):
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
            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
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
def head():
    pytest.importorskip("ray")
    node = Node("127.0.0.1", env={**LOOPBACK, **FAST_HEALTH, **NICE})
    yield node
    node.stop()


def ray_cli(*args: str, address: str, netns: str | None = None) -> subprocess.Popen:
    """The driver, as test_runner.run_cli starts the local runner; in `netns` if given."""
    cmd = [sys.executable, "-m", "bench.cli", "run", *args, "--no-progress", "--backend", "ray", "--address", address]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **({} if netns else LOOPBACK)}
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns, *cmd] if netns else cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    RUNNING.append(proc)
    return proc


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


def test_smoke_suite_on_ray_gives_the_local_successes(head, tmp_path):
    smoke = REPO / "suites" / "smoke.toml"
    local = run_cli(str(smoke), "--results", str(tmp_path / "local"))
    out_local, _ = local.communicate(timeout=900)
    assert local.returncode == 0, out_local
    proc = ray_cli(str(smoke), "--results", str(tmp_path / "ray"), address=head.address)
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
    proc = ray_cli(str(smoke), "--results", str(tmp_path / "ray"), address=head.address)
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


def test_killed_ray_worker_is_recorded_or_retried_and_rerun_completes(head, tmp_path):
    path = tmp_path / "kill.toml"
    path.write_text(RETRY_SUITE.format(name="kill", steps=100))
    directory = tmp_path / "r" / "kill"
    proc = ray_cli(str(path), "--results", str(tmp_path / "r"), address=head.address)
    lora = {t.id for t in suite.load(path).trials if t.spec["method"]["name"] == "lora"}
    killed: dict[str, tuple[int, set[int]]] = {}
    # Kill each LoRA trial's Ray worker, mid-trial, once: the frozen trial and the retry run on.
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        running = directory / ".running"
        for trial_id, pid, node_ip in [line.split() for line in running.read_text().splitlines()] if running.exists() else []:
            if trial_id in lora and trial_id not in killed and not (directory / f"{trial_id}.json").exists():
                assert node_ip == "127.0.0.1"
                time.sleep(1.0)
                killed[trial_id] = (int(pid), descendants(int(pid)))
                assert killed[trial_id][1], "the Ray worker runs the trial in a child process"
                os.kill(int(pid), signal.SIGKILL)
        time.sleep(0.1)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    for pid, children in killed.values():  # the trial's process died with its Ray worker
        wait_for(lambda: not any(alive(c) for c in children), timeout=30)
    found = load_all(directory)
    assert len(found) == 3, out
    by_rank = {r["spec"]["method"]["config"].get("r"): r for r in found.values()}
    failed, retried = by_rank[2], by_rank[4]
    assert failed["status"] == "failed" and "after 0 retries" in failed["error"], failed["error"]
    assert retried["status"] == "success" and retried["env"]["ray"]["worker_pid"] != killed[retried["trial_id"]][0]
    assert by_rank[None]["status"] == "success"
    assert not list(directory.glob(".*.tmp")) and not list(directory.glob(".*draft*"))
    mtimes = {p.stem: p.stat().st_mtime_ns for p in result_files(directory) if p.stem != failed["trial_id"]}

    proc = ray_cli(str(path), "--results", str(tmp_path / "r"), address=head.address)
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


def test_second_node_in_network_namespaces_shares_the_sweep(namespaces, tmp_path):
    pytest.importorskip("ray")
    a, b = namespaces
    head = Node("10.241.0.1", cpus=1, netns=a, env={**FAST_HEALTH, **NICE})
    try:
        worker = Node("10.241.0.2", head=head.address, cpus=1, netns=b, env={**FAST_HEALTH, **NICE})
        try:
            wait_for(
                lambda: "Ray runtime started" in (worker.temp / "start.log").read_text() or worker.proc.poll() is not None, timeout=120
            )
            assert worker.proc.poll() is None, (worker.temp / "start.log").read_text()[-2000:]
            path = make_suite(tmp_path, name="two")
            proc = ray_cli(str(path), "--results", str(tmp_path / "r"), address=head.address, netns=a)
            out, _ = proc.communicate(timeout=600)
            assert proc.returncode == 0, out
        finally:
            worker.stop()
    finally:
        head.stop()
    found = load_all(tmp_path / "r" / "two")
    assert len(found) == 4 and all(r["status"] == "success" for r in found.values()), out
    assert {r["env"]["ray"]["node_ip"] for r in found.values()} == {"10.241.0.1", "10.241.0.2"}
