"""VPP's startup.conf as render-startup writes it: no core file holds the ESP keys
unless the operator asks for one, and is told what it holds."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from vppmesh.cli import app
from vppmesh.startup import Instance, available_profiles, load_profile, render


def unix_section(text: str) -> list[str]:
    lines = text.splitlines()
    return [line.strip() for line in lines[lines.index("unix {") + 1:lines.index("}")]]


@pytest.mark.parametrize("name", sorted(available_profiles()))
def test_no_profile_lets_vpp_dump_its_keys_by_default(name: str, tmp_path: Path) -> None:
    """A crash of VPP must not leave its SAs' keys on disk: with full-coredump (hugepage
    profiles had it) a core file holds every live ESP key, and anyone who reads it later
    decrypts what was recorded, forward secrecy or not."""
    unix = unix_section(render(load_profile(name), Instance(runtime_dir=tmp_path)))
    assert "full-coredump" not in unix
    assert "coredump-size 0" in unix  # no core file at all, whatever ulimit says


def test_full_coredump_is_an_opt_in_with_a_warning(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    profile = load_profile("bare-metal-dpdk")
    with caplog.at_level(logging.WARNING):
        unix = unix_section(render(profile, Instance(runtime_dir=tmp_path), coredump=True))
    assert "full-coredump" in unix and "coredump-size 0" not in unix
    assert "core file holds every live ESP key" in caplog.text
    # The profile's own option does the same; --no-coredump overrides it.
    opted = tmp_path / "debug.yaml"
    opted.write_text(yaml.safe_dump({**profile.model_dump(), "full_coredump": True}))
    assert "full-coredump" in unix_section(render(load_profile(str(opted)),
                                                  Instance(runtime_dir=tmp_path)))
    assert "full-coredump" not in unix_section(render(load_profile(str(opted)),
                                                      Instance(runtime_dir=tmp_path),
                                                      coredump=False))


def test_render_startup_coredump_flag_warns(tmp_path: Path) -> None:
    runner = CliRunner()
    plain = runner.invoke(app, ["render-startup", "--profile", "xl710-avf"])
    assert plain.exit_code == 0, plain.output
    assert "full-coredump" not in plain.output and "ESP key" not in plain.output
    out = tmp_path / "startup.conf"
    opted = runner.invoke(app, ["render-startup", "--profile", "xl710-avf", "--coredump",
                                "--out", str(out)])
    assert opted.exit_code == 0, opted.output
    assert "full-coredump" in unix_section(out.read_text())
    assert "warning: VPP will write full core files: a core file holds every live ESP " \
           "key" in opted.output
