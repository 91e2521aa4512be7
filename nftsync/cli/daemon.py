"""`nftsync daemon`: parse the flags, check the configuration, hand over to
nftsync.daemon.service (the process runner: signals, reload, logging)."""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from nftsync.cli.common import emit, handle_errors, json_option, require_root
from nftsync.daemon.config import DEFAULT_CONFIG, DaemonConfig, load_config
from nftsync.endpoint import format_endpoint

log = logging.getLogger("nftsync.daemon")

#: syslog priorities for the "<N>" prefix journald understands on stdout/stderr (sd-daemon(3)).
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


@click.command("daemon")
@click.option("--config", "config_path", metavar="FILE",
              help=f"TOML config file (default: {DEFAULT_CONFIG}, if it exists).")
@click.option("--listen", metavar="ADDR:PORT",
              help="Address for peer connections (default 0.0.0.0:7777; [::]:7777 for IPv6).")
@click.option("--metrics-listen", metavar="ADDR:PORT",
              help="Serve Prometheus metrics at http://ADDR:PORT/metrics (default: off; port "
              "9477 if left out; docs/metrics.md).")
@click.option("--peer", "peers", multiple=True, metavar="ADDR:PORT",
              help="A peer load balancer (repeat for a mesh); port 7777 if left out.")
@click.option("--key-file", metavar="FILE",
              help="The cluster's pre-shared key (mode 0600, the same file on every node).")
@click.option("--tls-cert", metavar="FILE",
              help="This node's certificate (PEM, signed by --tls-ca, naming its sync IP): "
              "mutual TLS 1.3 on the sync link, with --tls-key and --tls-ca (default: off).")
@click.option("--tls-key", metavar="FILE", help="The private key of --tls-cert (mode 0600).")
@click.option("--tls-ca", metavar="FILE",
              help="The cluster's CA certificate: peers must present a certificate it signed.")
@click.option("--role", metavar="active|backup",
              help="active: this node serves the VIP now; backup: it stands by (default).")
@click.option("--socket", metavar="PATH", help="Control socket for `nftsync ctl` "
              "(default /run/nftsync/nftsync.sock).")
@click.option("--node-id", type=int, metavar="N",
              help="Node id 1..4294967295, unique in the cluster (default: from the node name).")
@click.option("--node-name", metavar="NAME", help="This node's name (default: the hostname).")
@click.option("--cluster", metavar="NAME",
              help="Cluster name; peers of another cluster are refused (default: nftsync).")
@click.option("--farm", "farms", multiple=True, metavar="NAME",
              help="Replicate only this farm (repeat; default: every nftsync farm).")
@click.option("--conntrack/--no-conntrack", default=None,
              help="Replicate the farms' conntrack entries too (default: yes).")
@click.option("--legacy-farm", "legacy_farms", multiple=True, metavar="FILE",
              help="Also replicate the xt_recent tables of this legacy iptables-recent farm "
              "(compat/farms/*.toml; repeat for several).")
@click.option("--log-level", metavar="LEVEL", help="debug, info (default), warning or error.")
@click.option("--log-format", metavar="FORMAT",
              help="text (default: for people and journald) or json (one object per line: "
                   "time, level, logger, message).")
@click.option("--check", is_flag=True,
              help="Only validate the configuration, print it (without the key) and exit.")
@json_option
@handle_errors
def command(config_path: str | None, listen: str | None, metrics_listen: str | None,
            peers: tuple[str, ...],
            key_file: str | None, tls_cert: str | None, tls_key: str | None,
            tls_ca: str | None, role: str | None, socket: str | None, node_id: int | None,
            node_name: str | None, cluster: str | None, farms: tuple[str, ...],
            conntrack: bool | None, legacy_farms: tuple[str, ...], log_level: str | None,
            log_format: str | None, check: bool, as_json: bool) -> None:
    """Replicate sessions and conntrack entries to the peer load balancers (the seed's ssyncd).

    Settings are read from the config file, then the flags override them. The key file is
    required: the same secret on every node (docs/daemon.md shows how to make one). The daemon
    runs in the foreground and logs to stderr (journald-friendly under systemd).

    \b
    Signals: SIGTERM/SIGINT stop it cleanly, SIGHUP re-reads the config file (a bad new file
    is logged and the running configuration kept). `nftsync ctl` queries and steers it.

    \b
    The seed's two modes (ssyncd -M -p 7777 / ssyncd -B -a 10.0.0.1 -p 7777):
      lb1# nftsync daemon --role active --listen :7777 --peer 10.0.0.2 \\
               --key-file /etc/nftsync/key
      lb2# nftsync daemon --role backup --listen :7777 --peer 10.0.0.1:7777 \\
               --key-file /etc/nftsync/key
    A 3-node mesh (every node lists the two others; run the same on lb2 and lb3):
      lb1# nftsync daemon --cluster prod --peer 10.0.0.2 --peer 10.0.0.3 \\
               --key-file /etc/nftsync/key --farm web
    From the config file, as systemd runs it (and checking it first):
      nftsync daemon --check --config /etc/nftsync/nftsync.toml
      nftsync daemon --config /etc/nftsync/nftsync.toml
    """
    overrides: dict[str, Any] = {
        "listen": listen, "peers": list(peers), "key_file": key_file, "role": role,
        "socket": socket, "node_id": node_id, "node_name": node_name, "cluster": cluster,
        "farms": list(farms), "conntrack": conntrack, "log_level": log_level,
        "log_format": log_format,
        "legacy_farms": list(legacy_farms), "metrics_listen": metrics_listen,
        "tls_cert": tls_cert, "tls_key": tls_key, "tls_ca": tls_ca,
    }
    config = load_config(config_path, overrides)
    if check:
        emit(as_json, describe(config), _describe_text)
        return
    require_root()
    # Imported here so that `--help`, `--check` and config errors never load the daemon.
    from nftsync.daemon.service import serve

    sys.exit(serve(config, config_path, overrides))


def describe(config: DaemonConfig) -> dict[str, Any]:
    """The effective configuration as JSON-able data, with the key itself left out."""
    return {
        "config_file": config.config_file, "node_name": config.node_name,
        "node_id": config.node_id, "cluster": config.cluster, "role": config.role,
        "listen": format_endpoint(config.listen_host, config.listen_port),
        "metrics_listen": format_endpoint(config.metrics_host, config.metrics_port)
        if config.metrics_host is not None else "off",
        "peers": [str(p) for p in config.peers], "key_file": config.key_file,
        "key_bytes": len(config.key),
        "tls": config.tls.describe() if config.tls is not None else "off",
        "farms": config.farms, "conntrack": config.conntrack,
        "legacy_farms": config.legacy_farms,
        "haproxy": [{"name": h.name, "admin_socket": h.admin_socket,
                     "peer_listen": format_endpoint(h.peer_host, h.peer_port),
                     "local_peer": h.local_peer, "haproxy_peer": h.haproxy_peer,
                     "tables": list(h.tables)} for h in config.haproxy],
        "socket": config.socket, "log_level": config.log_level,
        "log_format": config.log_format,
        "timing": {k: getattr(config, k) for k in ("heartbeat_interval", "peer_timeout",
                                                  "reconnect_min", "reconnect_max",
                                                  "batch_delay", "stall_after")},
        "limits": {"queue_limit": config.queue_limit, "batch_records": config.batch_records,
                   "event_buffer": config.event_buffer},
    }


def _describe_text(d: dict[str, Any]) -> str:
    lines = ["configuration is valid"]
    for key, value in d.items():
        if isinstance(value, dict):
            lines += [f"  {key}.{k:19} {v}" for k, v in value.items()]
            continue
        if key == "haproxy":
            value = "; ".join(f"{h['name']}: tables {', '.join(h['tables'])}, HAProxy peer "
                              f"{h['haproxy_peer']} dials {h['local_peer']} at "
                              f"{h['peer_listen']}, admin socket {h['admin_socket']}"
                              for h in value) or "(none)"
        elif key == "farms" and value is None:
            value = "(every nftsync farm)"
        elif isinstance(value, list):
            value = ", ".join(value) or "(none)"
        lines.append(f"  {key:26} {value}")
    return "\n".join(lines)
