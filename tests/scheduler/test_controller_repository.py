from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from pdserve.errors import InvalidArgument
from pdserve.scheduler.controller.repository import (
    GENERATION_KEY,
    NotFound,
    Repository,
    parse_config,
)
from tests.scheduler.controller_fakes import make_repo


def test_reads_the_deployment(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    entries = repo.entries()
    assert set(entries) == {"pdserve", "prefill_0", "prefill_1", "decode_0", "decode_1"}
    instances = repo.instances()
    assert "pdserve" not in instances  # the router is not a P/D instance
    assert instances["decode_1"].role == "decode"
    assert instances["prefill_0"].scenario == "default"
    assert instances["prefill_0"].generation == 0
    assert instances["prefill_0"].versions == (1,)


def test_switch_role_changes_role_and_bumps_generation(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    before = (repo.root / "decode_1" / "config.pbtxt").read_text()
    repo.switch_role("decode_1", "prefill", reason="test: more prefill")
    after = repo.entry("decode_1")
    assert after.role == "prefill" and after.generation == 1
    # Everything else in the config is unchanged.
    old, new = parse_config(before, "old"), parse_config(
        (repo.root / "decode_1" / "config.pbtxt").read_text(), "new")
    assert old.input == new.input and old.name == new.name and old.backend == new.backend
    assert (repo.root / "decode_1" / "1" / ".keep").exists()
    edits = [json.loads(line) for line in (tmp_path / "edits.jsonl").read_text().splitlines()]
    assert edits[-1]["kind"] == "switch_role" and edits[-1]["reason"] == "test: more prefill"
    assert edits[-1]["changes"]["role"] == ["decode", "prefill"]


def test_reload_and_set_model_bump_the_reload_trigger(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    repo.reload("prefill_0", reason="stub died")
    repo.set_model("prefill_0", "tiny-v2", reason="upgrade")
    entry = repo.entry("prefill_0")
    assert entry.params[GENERATION_KEY] == "2" and entry.params["model"] == "tiny-v2"
    assert [e.kind for e in repo.edits] == ["reload", "set_model"]


def test_bad_edits_raise_typed_errors(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    with pytest.raises(InvalidArgument, match="already has role"):
        repo.switch_role("prefill_0", "prefill", reason="x")
    with pytest.raises(InvalidArgument, match="only P/D roles"):
        repo.switch_role("pdserve", "decode", reason="x")
    with pytest.raises(InvalidArgument, match="switch only"):
        repo.switch_role("prefill_0", "router", reason="x")
    with pytest.raises(NotFound):
        repo.reload("nope", reason="x")
    with pytest.raises(InvalidArgument, match="bumped by the repository"):
        repo.set_params("prefill_0", {GENERATION_KEY: "9"}, "x", "x")
    with pytest.raises(NotFound):
        Repository(tmp_path / "missing")


def test_add_version_add_and_remove_instance(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    assert repo.add_version("decode_0", reason="new weights as version 2") == 2
    assert repo.entry("decode_0").versions == (1, 2)
    repo.add_instance("decode_2", template="decode_0", role="decode", scenario="long",
                      reason="scale out")
    new = repo.entry("decode_2")
    assert new.role == "decode" and new.scenario == "long" and new.generation == 1
    assert parse_config((repo.root / "decode_2" / "config.pbtxt").read_text(), "x").name == \
        "decode_2"
    with pytest.raises(InvalidArgument, match="already exists"):
        repo.add_instance("decode_2", template="decode_0", role="decode", scenario="x",
                          reason="x")
    repo.remove_instance("decode_2", reason="scale in")
    assert "decode_2" not in repo.entries()
    # Staging holds nothing but the lock file afterwards.
    assert [p.name for p in repo.staging.iterdir()] == ["lock"]


def test_edits_are_atomic_for_a_concurrent_reader(tmp_path: Path) -> None:
    """A poller never sees the model dir without a complete config (the final name)."""
    repo = make_repo(tmp_path)
    stop = threading.Event()
    seen_bad: list[str] = []
    reads = 0

    def poll() -> None:
        nonlocal reads
        while not stop.is_set():
            for name in ("decode_0", "prefill_0"):
                model = repo.root / name
                try:
                    text = (model / "config.pbtxt").read_text()
                except FileNotFoundError:
                    seen_bad.append(f"{name}: no config.pbtxt")
                    continue
                if not os.path.isdir(model / "1"):
                    seen_bad.append(f"{name}: no version folder")
                cfg = parse_config(text, name)
                if cfg.name != name or "role" not in cfg.parameters:
                    seen_bad.append(f"{name}: incomplete config")
                reads += 1

    thread = threading.Thread(target=poll)
    thread.start()
    try:
        for i in range(40):
            repo.switch_role("decode_0", "prefill" if i % 2 == 0 else "decode", reason="flip")
            repo.reload("prefill_0", reason="bump")
    finally:
        stop.set()
        thread.join()
    assert reads > 0
    assert seen_bad == []
    assert repo.entry("decode_0").generation == 40 and repo.entry("prefill_0").generation == 40
    assert [p.name for p in repo.staging.iterdir()] == ["lock"]


def test_edits_work_when_the_staging_directory_is_on_another_filesystem(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A repository that is a mount point (docker -v DIR:/models) has its staging
    directory beside it on another filesystem: the exchange fails with EXDEV.
    Every edit failed so (no failed instance was ever replaced); the one changed
    file now goes in through a copy in the model's own directory."""
    import errno

    from pdserve.scheduler.controller import repository as repo_mod

    def cross_device(a: Path, b: Path) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(repo_mod, "exchange_dirs", cross_device)
    repo = make_repo(tmp_path)
    repo.switch_role("decode_1", "prefill", reason="test")
    repo.reload("prefill_0", reason="test")
    assert repo.entry("decode_1").role == "prefill" and repo.entry("decode_1").generation == 1
    assert repo.entry("prefill_0").generation == 1
    for name in ("decode_1", "prefill_0"):
        assert sorted(p.name for p in (repo.root / name).iterdir()) == ["1", "config.pbtxt"]
    assert list(repo.staging.glob("*.*")) == []  # staged copies cleaned up
