"""The committed model_repository/ is exactly what `pdserve repo build` makes of the
default spec: a repository edited by hand (or left behind by a change to the
instance IO) would make `make serve` come up on configs the roles no longer speak."""

from __future__ import annotations

from pathlib import Path

from pdserve.cli import main as pdserve_main

ROOT = Path(__file__).resolve().parents[2]


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_committed_repository_matches_the_default_spec(tmp_path: Path) -> None:
    out = tmp_path / "repo"
    spec = ROOT / "backends" / "pdserve" / "server" / "default_spec.yaml"
    assert pdserve_main(["repo", "build", str(spec), "-o", str(out)]) == 0
    committed, generated = _tree(ROOT / "model_repository"), _tree(out)
    assert sorted(committed) == sorted(generated)
    for name, data in generated.items():
        assert committed[name] == data, (
            f"model_repository/{name} differs from `pdserve repo build` of the default spec; "
            "regenerate it with: pdserve repo build backends/pdserve/server/default_spec.yaml "
            "-o model_repository --force"
        )
