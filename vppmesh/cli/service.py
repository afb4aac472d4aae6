"""`vppmesh install-unit`: run the agent (`vppmesh up --watch`) as a systemd service."""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer()
UNIT_PATH = Path("/etc/systemd/system/vppmesh.service")
# Package data (pyproject.toml), beside the sources in every install.
TEMPLATE = Path(__file__).resolve().parent.parent / "systemd" / "vppmesh.service"
UNBUFFERED = "Environment=PYTHONUNBUFFERED=1"


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
        from vppmesh.vpp.compat import UNTESTED_ENV

        text = text.replace(UNBUFFERED, f"{UNBUFFERED}\nEnvironment={UNTESTED_ENV}=1", 1)
    return text


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
) -> None:
    """Write the systemd unit that runs `vppmesh up --watch` (options after -- go to up).

    The options are checked as `vppmesh up` parses them before the unit is written.
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
    if str(out) == "-":
        typer.echo(text, nl=False)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    typer.echo(f"wrote {out}; start it with: systemctl daemon-reload && "
               f"systemctl enable --now {out.stem}")
