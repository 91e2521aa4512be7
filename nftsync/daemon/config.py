"""Daemon configuration: what `nftsync daemon` needs to run, after the file and flags are merged.

`load_config` (below) reads /etc/nftsync/nftsync.toml and applies command-line overrides; the
daemon core only ever sees a validated `DaemonConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_PORT = 7777
DEFAULT_SOCKET = "/run/nftsync/nftsync.sock"
DEFAULT_CONFIG = "/etc/nftsync/nftsync.toml"


@dataclass(frozen=True, slots=True)
class PeerConfig:
    host: str
    port: int = DEFAULT_PORT

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(slots=True)
class DaemonConfig:
    key: bytes  # the pre-shared key (already loaded and checked from key_file)
    node_id: int  # u32, unique in the cluster, never 0
    node_name: str
    cluster: str = "nftsync"
    key_file: str = ""
    listen_host: str = "0.0.0.0"
    listen_port: int = DEFAULT_PORT
    peers: list[PeerConfig] = field(default_factory=list)
    role: str = "backup"  # "active" | "backup" (the seed's -M / -B)
    socket: str = DEFAULT_SOCKET
    farms: list[str] | None = None  # replicate only these farms (None: every nftsync farm)
    conntrack: bool = True  # replicate the farms' conntrack entries too
    heartbeat_interval: float = 1.0  # seconds between heartbeats on an idle connection
    peer_timeout: float = 5.0  # no frame for this long -> the connection is dead
    reconnect_min: float = 0.2  # reconnect backoff, doubling up to reconnect_max
    reconnect_max: float = 10.0
    queue_limit: int = 500_000  # records queued per peer before it is resnapshotted instead
    batch_records: int = 4_000  # records per UPDATES frame
    batch_delay: float = 0.002  # seconds to wait for more records before sending a batch
    stall_after: float = 10.0  # un-acked updates older than this -> health "degraded"
    config_file: str | None = None
