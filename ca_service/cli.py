"""The ``ca-service`` command: thin (arguments → settings → logging → one use case → output)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ca_service import admin_client, operations
from ca_service import app as app_module
from ca_service.config import Settings, load_settings, parse_duration
from ca_service.errors import CAServiceError, ConfigError
from ca_service.logs import configure_logging, escape, truncate

Handler = Callable[[argparse.Namespace, Settings], int]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ca-service", description="SPIFFE CA and rotation daemon for service meshes")
    _global_options(parser, default=None)
    # The global options are also accepted after the subcommand (`ca-service serve --config X`, as users
    # type it); SUPPRESS keeps a value given before the subcommand from being reset by the subparser.
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = sub.add_parser("init", parents=[common], help="create (or import) the CA explicitly")
    init.add_argument("--root-cert", type=Path, help="import this root certificate (PEM)")
    init.add_argument("--root-key", type=Path, help="key of the imported root (with --root-cert)")
    init.add_argument("--intermediate-cert", type=Path,
                      help="intermediate-only: our signing CA, issued by an offline root")
    init.add_argument("--intermediate-key", type=Path, help="key of --intermediate-cert")
    init.add_argument("--intermediate-chain", type=Path, help="certificates between the intermediate and the root")

    sub.add_parser("status", parents=[common], help="the chain and every managed certificate")

    issue = sub.add_parser("issue", parents=[common],
                           help="issue an X509-SVID to files (svid.pem, svid-key.pem, bundle.pem)")
    issue.add_argument("--spiffe-id", required=True)
    issue.add_argument("--out", type=Path, required=True)
    issue.add_argument("--ttl", type=parse_duration, help="lifetime, e.g. 1h (default: ca.workload_ttl)")

    export = sub.add_parser("export-cacerts", parents=[common], help="write istiod's plug-in CA files")
    export.add_argument("--dir", type=Path, required=True)

    bundle = sub.add_parser("bundle", parents=[common], help="print the trust bundle")
    bundle.add_argument("--format", choices=("pem", "spiffe"), default="pem")

    serve = sub.add_parser("serve", parents=[common], help="run the daemon until SIGTERM")
    serve.add_argument("--grpc-address", help="gRPC listener (host:port or unix:///path)")
    serve.add_argument("--http-address", help="HTTP side-port (host:port)")
    serve.add_argument("--bundle-address", help="SPIFFE bundle endpoint (host:port)")
    _admin_parser(sub, common)
    return parser


def _global_options(parser: argparse.ArgumentParser, *, default: Any) -> None:
    parser.add_argument("--config", type=Path, default=default,
                        help="YAML config file (default: embedded default; env CA_SERVICE_CONFIG)")
    parser.add_argument("--data-dir", type=Path, default=default,
                        help="state directory (default ./var/ca-service; env CA_SERVICE_DATA_DIR)")
    parser.add_argument("--trust-domain", default=default, help="trust domain (default cluster.local)")
    parser.add_argument("--json", action="store_true", default=False if default is None else default,
                        help="machine-readable output")
    parser.add_argument("--log-level", default=default, help="debug, info, warning, error")


def _admin_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    admin = sub.add_parser("admin", parents=[common],
                           help="talk to a running daemon's admin API (token from the data dir)")
    admin.add_argument("--url", help="side-port URL (default: the running daemon's, from the data dir or config)")
    admin_sub = admin.add_subparsers(dest="admin_command", required=True, metavar="ACTION")
    admin_sub.add_parser("status", parents=[common], help="chain, CA certificates, next rotations, SDS, bundles")
    rotate = admin_sub.add_parser("rotate", parents=[common], help="force a rotation (or plan one with --dry-run)")
    rotate.add_argument("--scope", required=True, choices=("workload", "namespace", "all-workloads", "intermediate",
                                                           "istiod-intermediate", "root"))
    rotate.add_argument("--reason", required=True, help="why (written to the audit log)")
    rotate.add_argument("--spiffe-id", help="with --scope workload")
    rotate.add_argument("--namespace", help="with --scope namespace")
    rotate.add_argument("--dry-run", action="store_true", help="report what would be rotated; change nothing")
    certs = admin_sub.add_parser("certificates", parents=[common], help="live certificates the daemon issued")
    for flag in ("--namespace", "--service-account", "--spiffe-id", "--issuer"):
        certs.add_argument(flag, help=f"only those with this {flag[2:].replace('-', ' ')}")
    for action, what in (("taint", "a CA whose key may have leaked: it never signs again, its SVIDs are re-issued"),
                         ("revoke", "a tainted, retired CA: it leaves every bundle")):
        cmd = admin_sub.add_parser(action, parents=[common], help=what)
        cmd.add_argument("--key-id", required=True, help="the CA's subject key id or serial (hex; see admin status)")
        cmd.add_argument("--reason", required=True, help="why (written to the audit log)")
        cmd.add_argument("--dry-run", action="store_true", help="report what would happen; change nothing")
        if action == "revoke":
            cmd.add_argument("--force", action="store_true",
                             help="revoke although live certificates still chain to it (they stop verifying)")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.data_dir:
        out["data_dir"] = str(args.data_dir)
    if args.trust_domain:
        out["trust_domain"] = args.trust_domain
    if args.log_level:
        out["logging"] = {"level": args.log_level}
    if args.command == "serve":
        # --grpc-address is applied after loading (_move_grpc_listener): it moves an address and
        # nothing else. The side-port and bundle endpoint have one listener each and no trust setting.
        if args.http_address:
            out["http"] = {"address": args.http_address}
        if args.bundle_address:
            out["bundle_endpoint"] = {"address": args.bundle_address}
    return out


def _is_local(address: str) -> bool:
    if address.startswith("unix://"):
        return True
    host = address.rpartition(":")[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def _move_grpc_listener(settings: Settings, address: str) -> Settings:
    """``serve --grpc-address``: the first configured gRPC listener moves to ``address``, keeping its TLS,
    policy and trust settings; a flag may move an address but never loosen security.

    Raises:
        ConfigError: if the move would expose a listener that trusts Envoy node metadata beyond this
            machine (anyone who can reach it could claim any identity).
    """
    first = settings.grpc[0]
    if first.trust_node_metadata and not _is_local(address):
        raise ConfigError([
            f"--grpc-address {address}: grpc[0] trusts Envoy node metadata for the caller's identity, which is "
            "safe only on loopback or a Unix socket; configure this listener in the config file instead "
            "(with tls and trust_node_metadata: false)"])
    moved = dataclasses.replace(first, address=address)
    return dataclasses.replace(settings, grpc=(moved, *settings.grpc[1:]))


def _emit(args: argparse.Namespace, payload: Any, text: str) -> None:
    sys.stdout.write((json.dumps(payload, indent=2, default=str) if args.json else text) + "\n")


def _cmd_init(args: argparse.Namespace, settings: Settings) -> int:
    report = operations.init(
        settings, root_cert=args.root_cert, root_key=args.root_key, intermediate_cert=args.intermediate_cert,
        intermediate_key=args.intermediate_key, intermediate_chain=args.intermediate_chain,
    )
    _emit(args, report, operations.render_init(report))
    return 0


def _cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    report = operations.status(settings)
    _emit(args, report, operations.render_status(report))
    return 0


def _cmd_issue(args: argparse.Namespace, settings: Settings) -> int:
    report = operations.issue(settings, args.spiffe_id, args.out, ttl=args.ttl)
    _emit(args, report, f"wrote {', '.join(report['files'])} for {report['spiffe_id']} "
          f"(serial {report['serial']}, not after {report['not_after']})")
    return 0


def _cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    report = operations.export_cacerts(settings, args.dir)
    _emit(args, report, f"wrote istiod cacerts to {report['dir']} (checked: {', '.join(report['files'])})")
    return 0


def _cmd_bundle(args: argparse.Namespace, settings: Settings) -> int:
    sys.stdout.write(operations.bundle(settings, args.format).decode())
    return 0


def _cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    daemon = app_module.build_app(settings)
    asyncio.run(daemon.run_until_signalled())
    return 0


def _cmd_admin(args: argparse.Namespace, settings: Settings) -> int:
    if args.admin_command == "status":
        doc = admin_client.status(settings, url=args.url)
        _emit(args, doc, admin_client.render_status(doc))
    elif args.admin_command == "certificates":
        filters = {"namespace": args.namespace, "service_account": args.service_account,
                   "spiffe_id": args.spiffe_id, "issuer": args.issuer}
        doc = admin_client.certificates(settings, filters=filters, url=args.url)
        _emit(args, doc, admin_client.render_certificates(doc))
    elif args.admin_command in ("taint", "revoke"):
        doc = admin_client.compromise(settings, action=args.admin_command, key_id=args.key_id, reason=args.reason,
                                      dry_run=args.dry_run, force=getattr(args, "force", False), url=args.url)
        _emit(args, doc, admin_client.render_compromise(doc))
    else:
        doc = admin_client.rotate(settings, scope=args.scope, reason=args.reason, spiffe_id=args.spiffe_id,
                                  namespace=args.namespace, dry_run=args.dry_run, url=args.url)
        _emit(args, doc, admin_client.render_rotation(doc))
    return 0


COMMANDS: dict[str, Handler] = {
    "init": _cmd_init,
    "status": _cmd_status,
    "issue": _cmd_issue,
    "export-cacerts": _cmd_export,
    "bundle": _cmd_bundle,
    "serve": _cmd_serve,
    "admin": _cmd_admin,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args.config, overrides=_overrides(args))
        if args.command == "serve" and args.grpc_address:
            settings = _move_grpc_listener(settings, args.grpc_address)
    except ConfigError as exc:
        sys.stderr.write(f"ca-service: {exc}\n")
        return 2
    configure_logging(settings.logging)
    try:
        return COMMANDS[args.command](args, settings)
    except CAServiceError as exc:
        sys.stderr.write(f"ca-service {args.command}: {escape(str(exc))}\n")
        return 1
    except OSError as exc:
        # A busy port, a read-only file, a full disk: the OS said no, and says where (the address or path).
        sys.stderr.write(f"ca-service {args.command}: {escape(_describe_os_error(exc))}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    except RuntimeError as exc:
        bind = _GRPC_BIND_FAILURE.match(str(exc))
        if bind is None:
            return _internal_error(args, exc)
        sys.stderr.write(f"ca-service {args.command}: cannot listen on {escape(bind[1])}: "
                         "address already in use or not available (gRPC listener)\n")
        return 1
    except Exception as exc:
        return _internal_error(args, exc)


# grpc.aio reports a failed bind only as this RuntimeError; the log line before it has the errno.
_GRPC_BIND_FAILURE = re.compile(r"^Failed to bind to address (\S+?);")


def _internal_error(args: argparse.Namespace, exc: Exception) -> int:
    # A bug: one line for the operator, the traceback only at debug level.
    logging.getLogger(__name__).debug("%s failed", args.command, exc_info=exc)
    sys.stderr.write(f"ca-service {args.command}: internal error ({type(exc).__name__}: "
                     f"{escape(truncate(str(exc), 300))}); rerun with --log-level debug for details\n")
    return 1


def _describe_os_error(exc: OSError) -> str:
    if exc.strerror and exc.filename:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc) or type(exc).__name__
