"""`vppmesh install-unit`: run the agent (`vppmesh up --watch`) as a systemd service, with
a drop-in for VPP's unit that gives a taken NIC back whenever VPP stops; `vppmesh
vpp-run`: VPP under the same guard where systemd does not run it (a container)."""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer

from vppmesh.cli.common import DEFAULT_STATE, StateOpt
from vppmesh.host import vpprun

app = typer.Typer()
UNIT_PATH = Path("/etc/systemd/system/vppmesh.service")
# Package data (pyproject.toml), beside the sources in every install.
TEMPLATE = Path(__file__).resolve().parent.parent / "systemd" / "vppmesh.service"
UNBUFFERED = "Environment=PYTHONUNBUFFERED=1"
# VPP's drop-in (systemd/vpp-uplink.conf), in vpp.service.d/ beside the agent's unit.
DROP_IN = TEMPLATE.parent / "vpp-uplink.conf"
DROP_IN_NAME = "vppmesh-uplink.conf"


def executable() -> list[str]:
    """How this vppmesh is started again: its script's absolute path (the virtualenv's,
    whose interpreter has vppmesh), else this interpreter with -m vppmesh."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "vppmesh":
        found = str(argv0) if argv0.is_absolute() or "/" in str(argv0) \
            else shutil.which(str(argv0))
        if found:
            return [str(Path(found).absolute())]
    return [sys.executable, "-m", "vppmesh"]


def _systemd_word(word: str) -> str:
    """One ExecStart word: shell-style quoting, and % and $ escaped for systemd."""
    return shlex.quote(word).replace("%", "%%").replace("$", "$$")


def render_unit(up_args: list[str], command: list[str] | None = None, *,
                untested_vpp: bool = False) -> str:
    """The shipped unit (vppmesh/systemd/vppmesh.service) for this host; `untested_vpp`
    lets the agent run with a VPP release vppmesh is not tested with (vpp/compat.py)."""
    text = (TEMPLATE.read_text()
            .replace("@EXEC@", " ".join(_systemd_word(w) for w in command or executable()))
            .replace(" @ARGS@", "".join(" " + _systemd_word(a) for a in up_args)))
    if untested_vpp:
        from vppmesh.dataplane.vpp.compat import UNTESTED_ENV

        text = text.replace(UNBUFFERED, f"{UNBUFFERED}\nEnvironment={UNTESTED_ENV}=1", 1)
    return text


def render_vpp_drop_in(state_dir: Path, command: list[str] | None = None) -> str:
    """The drop-in for vpp.service (vppmesh/systemd/vpp-uplink.conf): `ExecStopPost` gives
    every NIC saved in `state_dir` back to Linux whenever VPP stops. systemd runs it after
    a stop, a crash and an OOM kill alike, so on a host it is VPP's guard (in a container,
    `vppmesh vpp-run` is: vppmesh/host/vpprun.py)."""
    return (DROP_IN.read_text()
            .replace("@EXEC@", " ".join(_systemd_word(w) for w in command or executable()))
            .replace("@STATE@", _systemd_word(str(state_dir))))


def drop_in_path(unit: Path) -> Path:
    return unit.parent / "vpp.service.d" / DROP_IN_NAME


def up_state_dir(up_args: list[str]) -> Path:
    """The state directory `vppmesh up --watch` with these (valid) options uses."""
    from vppmesh.cli import mesh

    up = typer.main.get_command(mesh.app).commands["up"]  # type: ignore[attr-defined]
    return Path(up.make_context("vppmesh up", ["--watch", *up_args]).params["state_dir"])


def check_up_args(up_args: list[str]) -> str | None:
    """What `vppmesh up --watch` would say about these options (None: it takes them).

    They are parsed by `up`'s own parser, as the service will start it, so a typo is
    refused here rather than found by a unit that restarts every RestartSec."""
    from vppmesh.cli import mesh

    if any(a in ("--help", "-h") for a in up_args):
        return "--help is not an option for the service"
    up = typer.main.get_command(mesh.app).commands["up"]  # type: ignore[attr-defined]
    try:
        up.make_context("vppmesh up", ["--watch", *up_args])
    except Exception as exc:  # click's usage errors (typer vendors click from 0.22 on)
        message = getattr(exc, "format_message", None)
        if message is None:
            raise
        return str(message()).rstrip(".")
    return None


@app.command("install-unit", context_settings={"allow_extra_args": True,
                                               "ignore_unknown_options": True})
def install_unit(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(envvar="VPPMESH_UNIT_FILE",
                                      help="Where to write the unit; - prints it.")
                   ] = UNIT_PATH,
    allow_untested_vpp: Annotated[bool, typer.Option(
        help="Let the agent run with a VPP release vppmesh is not tested with (the unit "
        "sets VPPMESH_UNTESTED_VPP=1): for trying a new VPP before vppmesh supports it.")
                                  ] = False,
    vpp_drop_in: Annotated[Path | None, typer.Option(
        help="Where to write VPP's drop-in (default: vpp.service.d/vppmesh-uplink.conf "
        "beside the unit); - prints it.")] = None,
) -> None:
    """Write the systemd unit that runs `vppmesh up --watch` (options after -- go to up),
    and a drop-in for vpp.service that gives a taken NIC back to Linux whenever VPP stops.

    The options are checked as `vppmesh up` parses them before anything is written.
    Example: vppmesh install-unit -- --node node1 --take-uplink eth0
    """
    from vppmesh.cli.common import fail

    if "--watch" in ctx.args:
        ctx.args.remove("--watch")
    problem = check_up_args(list(ctx.args))
    if problem is not None:
        raise fail(f"install-unit: `vppmesh up` refuses the options after --: {problem}; "
                   "the service would restart every 2 s. Fix them (`vppmesh up --help` "
                   "lists them); nothing was written", 2)
    text = render_unit(list(ctx.args), untested_vpp=allow_untested_vpp)
    drop_in = render_vpp_drop_in(up_state_dir(list(ctx.args)))
    if vpp_drop_in is None and str(out) != "-":
        vpp_drop_in = drop_in_path(out)
    written = []
    for path, content in ((out, text), (vpp_drop_in, drop_in)):
        if path is None:
            continue
        if str(path) == "-":
            typer.echo(content, nl=False)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        written.append(str(path))
    if written:
        unit = UNIT_PATH if str(out) == "-" else out
        typer.echo(f"wrote {' and '.join(written)}; start it with: systemctl daemon-reload "
                   f"&& systemctl enable --now {unit.stem}")


@app.command("vpp-run", context_settings={"allow_extra_args": True,
                                         "ignore_unknown_options": True})
def vpp_run(
    ctx: typer.Context,
    state_dir: StateOpt = DEFAULT_STATE,
    kill_after: Annotated[float, typer.Option(
        help="Seconds VPP gets after a signal it was passed before it is killed (less "
        "than the container's grace period).")] = vpprun.KILL_AFTER_SECONDS,
) -> None:
    """Run VPP (the command after --) and give every taken NIC back to Linux when it
    exits, however it exits; exits with VPP's status.

    For VPP where systemd does not run it (the DaemonSet's vpp container): SIGTERM, SIGINT
    and SIGHUP are passed to VPP. Example: vppmesh vpp-run -- vpp -c /etc/vpp/startup.conf
    """
    from vppmesh.cli.common import fail
    from vppmesh.errors import VppMeshError

    try:
        status = vpprun.run(list(ctx.args), state_dir, kill_after=kill_after)
    except VppMeshError as exc:
        raise fail(str(exc), 2) from None
    raise typer.Exit(status)
