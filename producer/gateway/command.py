"""``pipeq gateway``: serve the HTTP API on uvicorn."""

from __future__ import annotations

import ipaddress

import click

from pipeq.errors import ConfigError

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    """True for a loopback address (or ``localhost``)."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; put TLS in front).")
@click.option("--port", type=int, default=8080, show_default=True, help="Port to listen on.")
@click.option("--no-auth", is_flag=True,
              help="Serve without API keys (only on a loopback --host; default: keys required).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True, help="uvicorn's log level.")
@click.pass_context
def gateway(ctx: click.Context, host: str, port: int, no_auth: bool, log_level: str) -> None:
    """The HTTP API (jobs, routes, health, metrics, OpenAPI) with signed webhooks.

    Needs the gateway extra: pip install 'pipeq[gateway]'. API keys come from
    PIPEQ_GATEWAY_API_KEYS or PIPEQ_GATEWAY_API_KEYS_FILE; TLS is a reverse proxy's job.
    """
    try:
        import uvicorn

        from pipeq.gateway.app import create_app
    except ImportError as exc:
        raise ConfigError(f"pipeq gateway needs the gateway extra (pip install "
                          f"'pipeq[gateway]'): {exc}") from None
    from pipeq.gateway.auth import load_keyring
    from pipeq.gateway.webhooks import secret_key
    from pipeq.ops.cli import quiet_logging, settings_of

    settings = settings_of(ctx)
    quiet_logging(settings, settings.log_level)
    keyring = load_keyring(settings)
    if no_auth:
        if not is_loopback(host):
            raise ConfigError(f"--no-auth serves anyone who can connect: it binds loopback "
                              f"only, not {host!r}. Configure API keys to listen there")
        if len(keyring):
            raise ConfigError("--no-auth with API keys configured: drop one or the other")
    elif not len(keyring):
        raise ConfigError("pipeq gateway refuses to start without API keys: set "
                          "PIPEQ_GATEWAY_API_KEYS=name:secret (or PIPEQ_GATEWAY_API_KEYS_FILE), "
                          "or run with --no-auth on a loopback --host for local use")
    if settings.webhook_secret is not None:
        secret_key(settings.webhook_secret.get_secret_value())
    app = create_app(settings, None if no_auth else keyring)
    click.echo(f"pipeq gateway on http://{host}:{port} "
               f"({'no auth' if no_auth else f'{len(keyring)} API key(s)'})", err=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False,
                proxy_headers=True, server_header=False)
