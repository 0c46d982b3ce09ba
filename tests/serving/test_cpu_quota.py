"""``cpu_quota``: an instance owns that many cores of CPU time (a cgroup of its own),
reserved for decodes (the largest CPU weight), gives the cgroup back on finalize
and on a failed load, and reports the quota as its compute unit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from pdserve.roles.cpu_quota import (
    CGROUP_ROOT,
    WEIGHTS,
    CpuQuota,
    CpuQuotaError,
    find_hierarchy,
    quota_us,
    sweep_stale,
)
from pdserve.roles.instance import reserves_cpu
from pdserve.scheduler.compute import CpuCounters, busy_shares, quota_unit
from pdserve.scheduler.controller.probe import TritonProbeClient
from pdserve.server.config import InstanceConfig, parse_parameters, to_parameters
from pdserve.server.repo import instances_from_spec

from .conftest import start_server
from .helpers import http_generate, stub_pid


def _real_cgroup_writable() -> bool:
    try:
        h = find_hierarchy()
    except CpuQuotaError:
        return False
    return os.access(h.current, os.W_OK)


needs_cgroup = pytest.mark.skipif(not _real_cgroup_writable(),
                                  reason="no writable cgroup CPU controller here")


def _fake_v2(tmp: Path) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (tmp / "svc").mkdir()
    (tmp / "svc" / "cgroup.procs").write_text("")
    return tmp


def test_hierarchy_from_proc_self_cgroup_v1_and_v2(tmp_path: Path) -> None:
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    h = find_hierarchy(v1, "4:memory:/x\n1:cpu:/jobs/a\n0::/\n")
    assert (h.version, h.current) == (1, v1 / "cpu" / "jobs" / "a")
    h = find_hierarchy(_fake_v2(tmp_path / "v2"), "0::/svc\n")
    assert (h.version, h.current) == (2, tmp_path / "v2" / "svc")
    with pytest.raises(CpuQuotaError, match="no cgroup CPU controller"):
        find_hierarchy(tmp_path / "none", "0::/svc\n")


def test_quota_per_period() -> None:
    assert quota_us(0.45) == 4500  # of a 10 ms period
    assert quota_us(2.0) == 20000
    assert quota_us(0.001) == 1000  # the kernel's minimum
    with pytest.raises(ValueError):
        quota_us(0)


def test_v2_join_writes_the_limit_and_release_moves_back(tmp_path: Path) -> None:
    root = _fake_v2(tmp_path)
    q = CpuQuota("prefill_0", 0.45, root=root, proc_cgroup="0::/svc\n", pid=4242,
                 server_pid=os.getpid())
    path = root / "svc" / f"pdserve-{os.getpid()}-prefill_0"
    assert q.path == path
    assert (path / "cpu.max").read_text() == "4500 10000"
    assert (path / "cgroup.procs").read_text() == "4242"
    assert (path / "cpu.weight").read_text() == "100"  # not reserved
    for name in ("cpu.max", "cpu.weight", "cgroup.procs"):  # a real cgroup's files go with rmdir
        (path / name).unlink()
    q.release()
    assert (root / "svc" / "cgroup.procs").read_text() == "4242"
    assert not path.exists()
    q.release()  # idempotent


def test_the_weight_is_written_on_join_and_follows_reserve(tmp_path: Path) -> None:
    v1 = tmp_path / "v1"
    (v1 / "cpu" / "svc").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    for root, proc_cgroup, version, parent in (
            (_fake_v2(tmp_path / "v2"), "0::/svc\n", 2, tmp_path / "v2" / "svc"),
            (v1, "1:cpu:/svc\n", 1, v1 / "cpu" / "svc")):
        name, default, high = WEIGHTS[version]
        stale = parent / f"pdserve-{os.getpid()}-decode_0"
        stale.mkdir()
        (stale / name).write_text(str(high))  # left reserved by a killed prefill stub
        prefill = CpuQuota("decode_0", 0.3, root=root, proc_cgroup=proc_cgroup, pid=4242,
                           server_pid=os.getpid())
        assert (stale / name).read_text() == str(default)
        prefill.reserve(True)  # switched to decode in place
        assert (stale / name).read_text() == str(high) and prefill.reserved
        prefill.reserve(False)
        assert (stale / name).read_text() == str(default) and not prefill.reserved
        decode = CpuQuota("decode_1", 0.3, reserved=True, root=root, proc_cgroup=proc_cgroup,
                          pid=4243, server_pid=os.getpid())
        assert (decode.path / name).read_text() == str(high)
        for q in (prefill, decode):
            for f in list(q.path.iterdir()):  # a real cgroup's files go with rmdir
                f.unlink()
            q.release()
        with pytest.raises(CpuQuotaError, match="was released"):
            decode.reserve(True)
    assert [r for r in ("prefill", "decode", "aggregated") if reserves_cpu(r)] == \
        ["decode", "aggregated"]


def test_no_writable_cgroup_is_a_clear_error(tmp_path: Path) -> None:
    root = _fake_v2(tmp_path)
    (root / "ro").write_text("")  # no directory can be made under it (as on a read-only fs)
    with pytest.raises(CpuQuotaError, match=r"cannot limit decode_0 to 0\.5 cores"):
        CpuQuota("decode_0", 0.5, root=root, proc_cgroup="0::/ro\n")
    with pytest.raises(ValueError, match="cannot name a cgroup"):
        CpuQuota("../x", 0.5, root=root, proc_cgroup="0::/svc\n")


def test_sweep_removes_only_empty_dirs_of_dead_servers(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (tmp_path / f"pdserve-{dead}-prefill_0").mkdir()  # dead server, empty: goes
    busy = tmp_path / f"pdserve-{dead}-decode_0"  # dead server, a process in it: stays
    busy.mkdir()
    (busy / "cgroup.procs").write_text("77\n")
    live = tmp_path / f"pdserve-{os.getpid()}-prefill_1"  # live server: stays
    live.mkdir()
    other = tmp_path / "someone-else"
    other.mkdir()
    assert sweep_stale(tmp_path) == [tmp_path / f"pdserve-{dead}-prefill_0"]
    assert busy.exists() and live.exists() and other.exists()


def test_config_and_spec_carry_the_quota() -> None:
    cfg = InstanceConfig(name="p", role="prefill", cpu_quota=0.45, cpu_cores=(0, 1))
    assert cfg.threads == 1  # one torch thread per whole core of quota
    assert InstanceConfig(name="p", role="prefill", cpu_quota=1.5, cpu_cores=(0, 1)).threads == 2
    assert parse_parameters("p", to_parameters(cfg)) == cfg
    with pytest.raises(ValueError, match="cpu_quota must be a number of cores"):
        parse_parameters("p", {"role": "prefill", "cpu_quota": "half"})
    with pytest.raises(ValueError, match=r"between 0\.01 and 1024"):
        InstanceConfig(name="p", role="decode", cpu_quota=0)
    with pytest.raises(ValueError, match="for prefill, decode and aggregated"):
        parse_parameters("r", {"role": "router", "cpu_quota": "1",
                               "routes": '{"default": {"prefill": ["p"], "decode": ["d"]}}'})
    spec = {"scenarios": {"default": {"prefill": 1, "decode": 1, "cpu_quota": 0.45},
                          "agg": {"aggregated": 1}}}
    quotas = {c.name: c.cpu_quota for c in instances_from_spec(spec)}
    assert quotas == {"pdserve": None, "prefill_0": 0.45, "decode_0": 0.45,
                      "aggregated_0": None}
    for bad in ({"prefill": 0.5}, "half", True):
        with pytest.raises(ValueError, match="cpu_quota must be a number of cores"):
            instances_from_spec({"scenarios": {"default": {"prefill": 1, "decode": 1,
                                                           "cpu_quota": bad}}})


def test_quota_unit_busy_is_own_ticks_over_the_quota(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    counters = CpuCounters(host="h", self_stat_path=str(stat), min_interval_s=0.0,
                           quota=("decode_0", 0.5))

    def sample(ticks: int) -> dict[str, list[int]]:
        stat.write_text(f"1 (stub x) S {' '.join(['0'] * 10)} {ticks} 0 0 0\n")
        return counters.read()

    a = sample(0)
    assert list(a) == [quota_unit("h", "decode_0")]
    time.sleep(0.5)
    b = sample(20)  # 0.2 s of CPU in ~0.5 s at a 0.5-core quota: ~80 % busy
    share = busy_shares(a, b)[quota_unit("h", "decode_0")]
    assert 0.5 < share <= 1.0


_BURN = textwrap.dedent("""
    import os, sys, time
    from pdserve.roles.cpu_quota import CpuQuota
    q = CpuQuota("burner", 0.3)
    print(q.path, flush=True)
    t0, c0 = time.monotonic(), time.process_time()
    while time.monotonic() - t0 < 1.5:
        pass
    share = (time.process_time() - c0) / (time.monotonic() - t0)
    q.release()
    print(share, os.path.exists(q.path), flush=True)
""")


@needs_cgroup
def test_a_real_quota_limits_the_process_and_is_given_back() -> None:
    out = subprocess.run([sys.executable, "-c", _BURN], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    path, share, exists = Path(out[0]), float(out[1]), out[2]
    assert share <= 0.36, share  # a busy loop held to 0.3 cores (the machine may give less)
    assert exists == "False" and not path.exists()
    assert path.is_relative_to(CGROUP_ROOT)


_CONTEND = textwrap.dedent("""
    import os, sys, time
    from pdserve.roles.cpu_quota import CpuQuota
    os.sched_setaffinity(0, {0})
    rivals = []
    for _ in range(4):  # default-weight busy loops on the same core
        pid = os.fork()
        if pid == 0:
            os.setsid()  # its own autogroup: one scheduling entity per loop
            t0 = time.monotonic()
            while time.monotonic() - t0 < 4.0:
                pass
            os._exit(0)
        rivals.append(pid)
    q = CpuQuota("contender", 0.3, reserved=sys.argv[1] == "1")
    time.sleep(0.2)  # the rivals are running
    t0, c0 = time.monotonic(), time.process_time()
    while time.monotonic() - t0 < 1.5:
        pass
    share = (time.process_time() - c0) / (time.monotonic() - t0)
    q.release()
    for pid in rivals:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    print(share, flush=True)
""")


@needs_cgroup
def test_a_reserved_quota_gets_its_cores_where_default_weight_work_crowds_them() -> None:
    """Five busy loops on one core, each its own scheduling entity: at the default
    weight the quota gets a fifth of it (less than its 0.3), reserved its 0.3."""
    shares = {}
    for reserved in ("0", "1"):
        shares[reserved] = float(subprocess.run(
            [sys.executable, "-c", _CONTEND, reserved], capture_output=True, text=True,
            timeout=60, check=True).stdout)
    assert shares["0"] < 0.25, shares
    assert 0.27 <= shares["1"] <= 0.36, shares


def _weight(group: Path) -> int:
    version = 1 if (group / "cpu.shares").exists() else 2
    return int((group / WEIGHTS[version][0]).read_text())


@needs_cgroup
def test_instances_run_in_their_quota_and_leave_no_cgroup(tmp_path: Path) -> None:
    spec = yaml.safe_load((Path(__file__).parent / "specs" / "tiny_pd.yaml").read_text())
    spec["scenarios"] = {"default": {"prefill": 1, "decode": 1, "cpu_quota": 0.5}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    server = start_server(str(tmp_path / "spec.yaml"), tmp_path)
    parent = find_hierarchy().current
    with server:
        assert server.process is not None
        for model in ("prefill_0", "decode_0"):
            pid = stub_pid(server, model)
            cpu_line = next(line for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
                            if line.split(":")[1] in ("cpu", "cpu,cpuacct", ""))
            group = parent / f"pdserve-{server.process.pid}-{model}"
            assert cpu_line.endswith(f"/{group.name}"), cpu_line
            assert group.is_dir()
        status, reply = http_generate(server.options.http_url,
                                      {"input_ids": list(range(5, 37)), "max_tokens": 8,
                                       "ignore_eos": True})
        assert status == 200 and isinstance(reply, dict), reply
        assert len(reply["output_ids"]) == 8, reply
        groups = sorted(parent.glob(f"pdserve-{server.process.pid}-*"))
        assert [g.name.rsplit("-", 1)[1] for g in groups] == ["decode_0", "prefill_0"]
        version = 1 if (groups[0] / "cpu.shares").exists() else 2
        _, default, high = WEIGHTS[version]
        assert [_weight(g) for g in groups] == [high, default]  # the decode is reserved
        # Switched in place, the prefill takes the decode's weight, and back.
        probe = TritonProbeClient(timeout_s=10.0)
        for role, weight in (("decode", high), ("prefill", default)):
            result = probe.set_role(server.options.http_url, "prefill_0", role)
            assert result.ok and result.load is not None and result.load.role == role, result
            assert _weight(groups[1]) == weight, role
    assert not any(g.exists() for g in groups)
