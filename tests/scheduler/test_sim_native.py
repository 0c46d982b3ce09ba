"""The native (mypyc) build of the simulator's event machinery.

It must give exactly the interpreted simulator's outcomes (the pinned runs'
fingerprints, and the multi-process path that sends native results back), run
the policies interpreted, and never be used when it was built from other
sources. Building takes about 15 s (mypyc and gcc), once for the module.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pdserve.scheduler.sim import native

ROOT = Path(__file__).resolve().parents[2]

_RUN = """
import json, sys
from pdserve.scheduler.sim.cluster import Cluster
from pdserve.scheduler.sim.native import native_modules
from pdserve.scheduler.sim.runner import run_result
from tests.scheduler.sim_helpers import profile
from tests.scheduler.test_sim_pinned import CASES, _fingerprint
import pdserve.scheduler.forwarding as fw, pdserve.scheduler.decode_choice as dc
out = {}
for name, cfg in CASES.items():
    c = Cluster(cfg, profile())
    c.run()
    out[name] = _fingerprint(c)
parts = run_result(CASES["failures_ratio"], profile(), workers=2, parts=3)
out["parts"] = [len(parts.outcomes), parts.events, parts.outcomes.counts()]
out["native"] = native_modules()
out["policies"] = [fw.__file__, dc.__file__]
json.dump(out, sys.stdout)
"""


def _python(code: str, env_dir: Path | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != native.ENV}
    if env_dir is not None:
        env[native.ENV] = str(env_dir)
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return native.build(tmp_path_factory.mktemp("native") / "sim-native")


def test_native_run_equals_the_interpreted_one(build_dir: Path) -> None:
    from tests.scheduler.test_sim_pinned import PINNED

    assert native.is_current(build_dir)
    proc = _python(_RUN, build_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["native"] == list(native.MODULES)  # every listed module ran compiled
    assert all(f.endswith(".py") for f in out["policies"])  # the policies did not
    for name, fingerprint in PINNED.items():
        assert out[name] == fingerprint, name
    from pdserve.scheduler.sim.runner import run_result
    from tests.scheduler.sim_helpers import profile
    from tests.scheduler.test_sim_pinned import CASES

    one = run_result(CASES["failures_ratio"], profile())  # interpreted, in this process
    assert out["parts"] == [len(one.outcomes), one.events, one.outcomes.counts()]


def test_a_build_of_other_sources_is_refused(build_dir: Path, tmp_path: Path) -> None:
    stale = tmp_path / "stale"
    shutil.copytree(build_dir, stale)
    (stale / "DIGEST").write_text("0" * 64 + "\n")
    assert not native.is_current(stale)
    proc = _python("import pdserve.scheduler.sim.cluster", stale)
    assert proc.returncode != 0
    assert "built from other sources" in proc.stderr and "native build" in proc.stderr
    proc = _python("import pdserve.scheduler.sim", tmp_path / "nothing")
    assert proc.returncode != 0 and "no build there" in proc.stderr
    proc = _python("import pdserve.scheduler.sim.cluster as c; print(c.__file__)", None)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("cluster.py")


def test_digest_follows_the_compiled_sources(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "sim"
    shutil.copytree(native._SIM, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(native, "_SIM", copy)
    before = native.digest()
    (copy / "control.py").write_text("# not compiled: no rebuild needed\n")
    assert native.digest() == before
    with (copy / "index.py").open("a") as f:
        f.write("\n# changed\n")
    assert native.digest() != before
