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


def render_unit(up_args: list[str], command: list[str] | None = None) -> str:
    """The shipped unit (vppmesh/systemd/vppmesh.service) for this host."""
    return (TEMPLATE.read_text()
            .replace("@EXEC@", " ".join(_systemd_word(w) for w in command or executable()))
            .replace(" @ARGS@", "".join(" " + _systemd_word(a) for a in up_args)))


@app.command("install-unit", context_settings={"allow_extra_args": True,
                                               "ignore_unknown_options": True})
def install_unit(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(envvar="VPPMESH_UNIT_FILE",
                                      help="Where to write the unit; - prints it.")
                   ] = UNIT_PATH,
) -> None:
    """Write the systemd unit that runs `vppmesh up --watch` (options after -- go to up).

    Example: vppmesh install-unit -- --node node1 --take-uplink eth0
    """
    if "--watch" in ctx.args:
        ctx.args.remove("--watch")
    text = render_unit(list(ctx.args))
    if str(out) == "-":
        typer.echo(text, nl=False)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    typer.echo(f"wrote {out}; start it with: systemctl daemon-reload && "
               f"systemctl enable --now {out.stem}")
