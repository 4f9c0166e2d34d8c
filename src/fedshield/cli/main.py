"""The ``fedshield`` command: parses, loads config, calls the library, renders."""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand, TyperOption

from fedshield.errors import FedShieldError

if TYPE_CHECKING:
    from fedshield.core.registry import Registry


def strict_json(data: Any) -> str:
    """Indented strict JSON: an infinite or NaN number is ``null``.

    A summary says why where that can happen (``epsilon_unbounded``).
    """
    from fedshield.simulation.rundir import dumps

    return dumps(data, indent=2)


__all__ = ["app", "main"]

app = typer.Typer(
    name="fedshield",
    help="Federated learning that protects privacy and proves it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)


# --- help read from the registries -------------------------------------------
#
# The names an option accepts, and their descriptions, come from the registries
# (robust rules, attacks, backends) when the help is shown: the registries'
# modules load only then, and a part registered later is listed.


def _rules() -> Registry[Any]:
    from fedshield.strategies.robust import RULES

    return RULES


def _attacks() -> Registry[Any]:
    from fedshield.models.attacks import ATTACKS

    return ATTACKS


def _backends() -> Registry[Any]:
    from fedshield.simulation.backends import BACKENDS

    return BACKENDS


def _names(registry: Registry[Any], *, tag: str | None = None) -> str:
    return escape(", ".join(registry.names(tag=tag)))


def _listing(title: str, registry: Registry[Any]) -> str:
    """A help paragraph per name: ``title``, then ``name: description``."""
    lines = [f"{name}: {text}" for name, text in registry.descriptions().items()]
    return "\n\n".join(escape(line) for line in (title, *lines))


_OPTION_HELP: dict[tuple[str, str], Callable[[], str]] = {
    ("simulate", "backend"): lambda: f"Override run.backend: {_names(_backends())}.",
    ("analyze", "attacks"): lambda: (
        f"Comma-separated attacks: {_names(_attacks())} (a no-attack row is "
        "always added)."
    ),
    ("analyze", "defences"): lambda: f"Comma-separated defences: {_names(_rules())}.",
    ("analyze", "fraction"): lambda: (
        "Share of malicious clients, in (0, 0.5); robust.f = floor(fraction x "
        f"clients per round) for {_names(_rules(), tag='needs_f')}."
    ),
}
"""(command, option) -> its help, made when the help is shown."""

_EPILOG: dict[str, Callable[[], str]] = {
    "simulate": lambda: _listing("Backends:", _backends()),
    "analyze": lambda: (
        _listing("Attacks:", _attacks()) + "\n\n" + _listing("Defences:", _rules())
    ),
}
"""command -> the text after its options, made when the help is shown."""


class _RegistryHelp(TyperCommand):
    """A command whose help reads the registries when it is shown."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        for param in self.params:
            made = _OPTION_HELP.get((str(self.name), str(param.name)))
            if made is not None and isinstance(param, TyperOption):
                param.help = made()
        epilog = _EPILOG.get(str(self.name))
        if epilog is not None:
            self.epilog = epilog()
        super().format_help(ctx, formatter)


def _fail(err: FedShieldError) -> typer.Exit:
    err_console.print(
        f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True
    )
    return typer.Exit(code=err.exit_code)


@app.command(cls=_RegistryHelp)
def simulate(
    config: Annotated[
        Path,
        typer.Argument(help="Experiment configuration (TOML).", show_default=False),
    ],
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override a key: section.key=VALUE (VALUE is parsed as TOML). "
            "Repeatable.",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Run folder (default: runs/<run.name>).", show_default=False),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in the run folder.")
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace a previous run in the run folder."),
    ] = False,
    seed: Annotated[
        int | None, typer.Option(help="Override run.seed.", show_default=False)
    ] = None,
    backend: Annotated[
        str | None,
        typer.Option(
            help="Override run.backend (the backends are listed below).",
            show_default=False,
        ),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address",
            help="Join this Ray cluster (with --backend ray); default: start a "
            "local Ray.",
            show_default=False,
        ),
    ] = None,
    output_format: Annotated[
        str,
        typer.Option(
            "--format", help="text: progress and summary; json: summary JSON on stdout."
        ),
    ] = "text",
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log details to stderr.")
    ] = False,
) -> None:
    """Run a simulated federation from a TOML configuration."""
    from fedshield.cli.simulate import run_simulate

    if output_format not in ("text", "json"):
        err_console.print(
            "[bold red]error:[/] --format must be 'text' or 'json'; "
            f"got {output_format!r}"
        )
        raise typer.Exit(code=2)
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(name)s: %(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, show_time=False)],
    )
    if resume and overwrite:
        err_console.print(
            "[bold red]error:[/] --resume continues the run in the folder and "
            "--overwrite replaces it; pass one of them"
        )
        raise typer.Exit(code=2)
    overrides = list(set_ or [])
    if seed is not None:
        overrides.append(f"run.seed={seed}")
    if backend is not None:
        overrides.append(f"run.backend={json.dumps(backend)}")
    if ray_address is not None:
        overrides.append(f"run.ray_address={json.dumps(ray_address)}")
    try:
        summary = run_simulate(
            config,
            overrides=overrides,
            out=out,
            resume=resume,
            overwrite=overwrite,
            as_json=output_format == "json",
            console=err_console,
        )
    except FedShieldError as err:
        raise _fail(err) from None
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]; resume with --resume")
        raise typer.Exit(code=130) from None
    if output_format == "json":
        typer.echo(strict_json(summary))


@app.command(cls=_RegistryHelp)
def analyze(
    config: Annotated[
        Path,
        typer.Argument(help="Experiment configuration (TOML).", show_default=False),
    ],
    attacks: Annotated[
        str,
        typer.Option(
            help="Comma-separated attacks (listed below; a no-attack row is "
            "always added).",
        ),
    ] = "label_flip,sign_flip,alie,ipm,backdoor",
    defences: Annotated[
        str,
        typer.Option(
            help="Comma-separated defences (the robust rules, listed below).",
        ),
    ] = "fedavg,krum,median,trimmed_mean,bulyan,geomed,norm_bound,fltrust",
    fraction: Annotated[
        float,
        typer.Option(
            help="Share of malicious clients, in (0, 0.5); robust.f = "
            "floor(fraction x clients per round) for the rules that take f."
        ),
    ] = 0.2,
    max_norm: Annotated[
        float | None,
        typer.Option(
            "--max-norm",
            help="norm_bound's L2 bound on each client's update (default: the "
            "file's robust.max_norm, else 1.0).",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Analysis folder (default: runs/<run.name>-analyze).",
            show_default=False,
        ),
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Runs at a time, each in its own process with one torch thread "
            "(1: one after the other, in this process).",
        ),
    ] = 1,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override a key of every run: section.key=VALUE (TOML). Repeatable.",
        ),
    ] = None,
    output_format: Annotated[
        str,
        typer.Option(
            "--format",
            help="text: progress and the matrix; json: paths and summary on stdout.",
        ),
    ] = "text",
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log details to stderr.")
    ] = False,
) -> None:
    """Run every attack against every defence; write matrix.csv, .png and .html."""
    if output_format not in ("text", "json"):
        err_console.print(
            "[bold red]error:[/] --format must be 'text' or 'json'; "
            f"got {output_format!r}"
        )
        raise typer.Exit(code=2)
    from rich.logging import RichHandler

    from fedshield.cli.analyze import run_analyze

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(name)s: %(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, show_time=False)],
    )
    try:
        summary = run_analyze(
            config,
            attacks=attacks,
            defences=defences,
            fraction=fraction,
            max_norm=max_norm,
            out=out,
            workers=workers,
            overrides=list(set_ or []),
            as_json=output_format == "json",
            console=err_console,
        )
    except FedShieldError as err:
        raise _fail(err) from None
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        raise typer.Exit(code=130) from None
    if output_format == "json":
        typer.echo(strict_json(summary))


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (runs/<name>).")],
) -> None:
    """Rebuild report.html of a finished or stopped run."""
    from fedshield.report import write_report

    try:
        path = write_report(run_dir)
    except FedShieldError as err:
        raise _fail(err) from None
    typer.echo(str(path))


@app.command()
def account(
    sampling_rate: Annotated[
        float,
        typer.Option(
            "--sampling-rate",
            help="q in (0, 1]: probability that a record (client) takes part "
            "in a step.",
            show_default=False,
        ),
    ],
    steps: Annotated[
        int,
        typer.Option(
            help="Number of steps (rounds) composed, >= 1.", show_default=False
        ),
    ],
    delta: Annotated[
        float, typer.Option(help="Target delta in (0, 1).", show_default=False)
    ],
    noise_multiplier: Annotated[
        float | None,
        typer.Option(
            "--noise-multiplier",
            help="sigma = noise std / L2 sensitivity: print the epsilon it gives.",
            show_default=False,
        ),
    ] = None,
    target_epsilon: Annotated[
        float | None,
        typer.Option(
            "--target-epsilon",
            help="Print the smallest noise multiplier that stays within this epsilon.",
            show_default=False,
        ),
    ] = None,
    accountant: Annotated[str, typer.Option(help="pld (tighter) or rdp.")] = "pld",
    output_format: Annotated[
        str, typer.Option("--format", help="text: a table; json: one JSON object.")
    ] = "text",
) -> None:
    """Epsilon of a Poisson-subsampled Gaussian mechanism, or sigma for a target."""
    if output_format not in ("text", "json"):
        err_console.print(
            "[bold red]error:[/] --format must be 'text' or 'json'; "
            f"got {output_format!r}"
        )
        raise typer.Exit(code=2)
    if accountant not in ("pld", "rdp"):
        err_console.print(
            "[bold red]error:[/] --accountant must be 'pld' or 'rdp'; "
            f"got {accountant!r}"
        )
        raise typer.Exit(code=2)
    if (noise_multiplier is None) == (target_epsilon is None):
        err_console.print(
            "[bold red]error:[/] pass exactly one of --noise-multiplier (to get "
            "epsilon) and --target-epsilon (to get the noise multiplier)"
        )
        raise typer.Exit(code=2)
    from rich.console import Console

    from fedshield.cli.account import run_account

    try:
        summary = run_account(
            sampling_rate=sampling_rate,
            steps=steps,
            delta=delta,
            noise_multiplier=noise_multiplier,
            target_epsilon=target_epsilon,
            accountant="rdp" if accountant == "rdp" else "pld",
            as_json=output_format == "json",
            console=Console(),
        )
    except FedShieldError as err:
        raise _fail(err) from None
    if output_format == "json":
        typer.echo(strict_json(summary))


@app.command()
def version() -> None:
    """Print the fedshield version."""
    from fedshield._version import __version__

    typer.echo(__version__)


def main(argv: list[str] | None = None) -> Any:
    """Console entry point."""
    try:
        return app(args=argv, prog_name="fedshield")
    finally:
        # The process is about to end: spare the interpreter's shutdown from
        # walking every object torch and numpy created (measured: 1.1 s of
        # exit after a quick-start run, 0.1 s with this).
        gc.freeze()


ca_app = typer.Typer(
    help=(
        "The federation's certificate authority: the operator creates it and "
        "approves sites; a site requests a certificate (its key never leaves "
        "its folder)."
    ),
    no_args_is_help=True,
)
app.add_typer(ca_app, name="ca")


@ca_app.command("init")
def ca_init(
    ca_dir: Annotated[Path, typer.Argument(help="Folder for the CA (created).")],
    server_host: Annotated[
        str,
        typer.Option(
            "--server-host", help="The server's host name or IP (in its certificate)."
        ),
    ],
) -> None:
    """Create the CA and the server's key and certificate (operator)."""
    from fedshield.transport.ca import init_ca

    try:
        paths = init_ca(ca_dir, server_host)
    except FedShieldError as err:
        raise _fail(err) from None
    typer.echo(f"CA in {paths.root}: ca.crt, ca.key, server.crt, server.key, ca.crl")


@ca_app.command("request")
def ca_request(
    name: Annotated[str, typer.Argument(help="The site's name (its identity).")],
    out: Annotated[
        Path, typer.Option("--out", help="Folder for the site's key and CSR.")
    ],
) -> None:
    """Make a site's key and certificate request (site; send only the .csr)."""
    from fedshield.transport.ca import request

    try:
        csr = request(name, out)
    except FedShieldError as err:
        raise _fail(err) from None
    typer.echo(f"send {csr} to the operator; {name}.key stays in {out}")


@ca_app.command("approve")
def ca_approve(
    csr: Annotated[Path, typer.Argument(help="The site's .csr file.")],
    ca: Annotated[Path, typer.Option("--ca", help="The CA folder.")],
    out: Annotated[
        Path, typer.Option("--out", help="Folder for the certificate and ca.crt.")
    ],
) -> None:
    """Sign a site's request: its certificate and ca.crt into --out (operator)."""
    from fedshield.transport.ca import approve

    try:
        cert = approve(csr, ca, out)
    except FedShieldError as err:
        raise _fail(err) from None
    typer.echo(f"wrote {cert} and {out / 'ca.crt'}: hand both to the site")


@ca_app.command("revoke")
def ca_revoke(
    name: Annotated[str, typer.Argument(help="The site whose certificate to revoke.")],
    ca: Annotated[Path, typer.Option("--ca", help="The CA folder.")],
) -> None:
    """Put a site's certificate on the CA's revocation list (operator)."""
    from fedshield.transport.ca import revoke

    try:
        revoke(name, ca)
    except FedShieldError as err:
        raise _fail(err) from None
    typer.echo(f"revoked {name}: {ca / 'ca.crl'} lists it")


@app.command()
def serve(
    config: Annotated[
        Path,
        typer.Argument(help="The run's configuration (TOML, with a network section)."),
    ],
    ca: Annotated[
        Path | None,
        typer.Option("--ca", help="The federation's CA folder (fedshield ca init)."),
    ] = None,
    state: Annotated[
        Path,
        typer.Option(
            "--state",
            help="State folder: the run's outputs, state.db and blobs; the same "
            "folder again resumes the run.",
        ),
    ] = Path("server-state"),
    listen: Annotated[
        str, typer.Option("--listen", help="HOST:PORT to listen on (port 0: any).")
    ] = "127.0.0.1:8443",
    insecure: Annotated[
        bool,
        typer.Option("--insecure", help="No TLS (tests on 127.0.0.1 only)."),
    ] = False,
    port_file: Annotated[
        Path | None,
        typer.Option("--port-file", help="Write the bound port here once listening."),
    ] = None,
    format_: Annotated[
        str, typer.Option("--format", help="text or json (the summary).")
    ] = "text",
) -> None:
    """Serve a federation to sites over gRPC with mutual TLS (operator)."""
    from fedshield.cli.network import run_serve

    if (ca is None) == (not insecure):
        raise _fail(
            FedShieldError(
                "give --ca CA_DIR (mutual TLS), or --insecure on 127.0.0.1 for tests"
            )
        )
    try:
        run_serve(
            config,
            ca=ca,
            state=state,
            listen=listen,
            port_file=port_file,
            as_json=format_ == "json",
            console=Console(),
        )
    except FedShieldError as err:
        raise _fail(err) from None


@app.command()
def join(
    server: Annotated[str, typer.Option("--server", help="HOST:PORT of the server.")],
    data: Annotated[
        Path,
        typer.Option(
            "--data", help="SITE.toml: this site's data section (its own data only)."
        ),
    ],
    identity: Annotated[
        Path | None,
        typer.Option("--identity", help="Folder with NAME.key, NAME.crt and ca.crt."),
    ] = None,
    policy: Annotated[
        Path | None,
        typer.Option("--policy", help="POLICY.toml: what this site takes part in."),
    ] = None,
    model: Annotated[
        Path | None,
        typer.Option(
            "--model", help="This site's copy of a Python model factory (kind python)."
        ),
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="No TLS (tests on 127.0.0.1 only).")
    ] = False,
    name: Annotated[
        str | None, typer.Option("--name", help="The site's name with --insecure.")
    ] = None,
    connect_timeout: Annotated[
        float,
        typer.Option(
            "--connect-timeout", help="Seconds to retry an unreachable server."
        ),
    ] = 300.0,
) -> None:
    """Join a federation as a site: outbound connections only (site)."""
    from fedshield.cli.network import run_join

    try:
        run_join(
            server,
            data=data,
            identity=identity,
            policy=policy,
            model=model,
            insecure=insecure,
            name=name,
            connect_timeout_s=connect_timeout,
            console=Console(),
        )
    except FedShieldError as err:
        raise _fail(err) from None
