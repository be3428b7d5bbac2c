"""``blackbox-sat serve-device``: load a device, read the token, open the journal file and
serve until SIGINT/SIGTERM (the server itself is :class:`~.server.DeviceServer`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .contract import InvalidInput
from .journal import default_journal
from .server import DeviceServer, log
from .wire import DEFAULT_MAX_MESSAGE_BYTES, TOKEN_ENV


def read_token(token_file: str | Path | None = None, env: str = TOKEN_ENV) -> str:
    """The server token from ``token_file`` (stripped) or the environment variable."""
    if token_file is not None:
        path = Path(token_file)
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise InvalidInput(f"cannot read --token-file {path}: {exc}") from exc
        if not token:
            raise InvalidInput(f"--token-file {path} is empty")
        try:
            if path.stat().st_mode & 0o077:
                log.warning("token file %s is readable by other users; chmod 600 it", path)
        except OSError:
            pass
        return token
    token = os.environ.get(env, "").strip()
    if not token:
        raise InvalidInput(
            f"serve-device needs a token: --token-file FILE or ${env}. Make one with "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))' > token && chmod 600 token`"
        )
    return token


def serve(
    spec: str,
    device_kw: dict | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    token_file: str | Path | None = None,
    journal: str | Path | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    out=None,
    threads: int = 1,
) -> int:
    """``blackbox-sat serve-device``: load ``spec``, listen, print the address, serve until
    SIGINT/SIGTERM. Prints ``listening on tcp://HOST:PORT`` (with the port picked when 0)
    as its first stdout line, flushed.

    ``threads``: torch threads (0 keeps torch's default). One, as for trials: the device
    answers one small query at a time, and a thread pool per core only competes with the
    trainers on the same machine."""
    import signal
    import sys

    import torch

    from .spec import load_device

    if threads:
        torch.set_num_threads(threads)
    out = out or sys.stdout
    token = read_token(token_file)
    journal = Path(journal) if journal is not None else default_journal(token_file)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    if spec.startswith("tcp://"):
        raise InvalidInput(
            "serve-device serves a local device; give a simulator or package.module:factory spec"
        )
    device = load_device(spec, **(device_kw or {}))
    try:
        server = DeviceServer(
            device,
            token,
            host=host,
            port=port,
            journal=journal,
            max_message_bytes=max_message_bytes,
            name=spec,
        )
    except OSError as exc:
        raise InvalidInput(f"cannot listen on {host}:{port}: {exc}") from exc
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "listening on %s: traffic is not encrypted; tunnel it (ssh -L) across untrusted networks",
            host,
        )

    def _stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    print(f"listening on {server.url}", file=out, flush=True)
    print(
        f"device {spec}: n_params={server.info.n_params} in_dim={server.info.in_dim} out_dim={server.info.out_dim}; "
        f"journal {journal} ({len(server.journal)} results)",
        file=out,
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    print("serve-device stopped", file=out, flush=True)
    return 0
