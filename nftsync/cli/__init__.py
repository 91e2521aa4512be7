"""The `nftsync` command line: a thin click layer that parses, calls the library, and prints.

Each subcommand lives in its own module (one module per subcommand, as ExaBGP does) and holds no
logic of its own beyond argument parsing and output formatting.
"""

from __future__ import annotations

import click

from nftsync import __version__
from nftsync.cli import common


@click.group(
    cls=common.LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="nftsync")
def main() -> None:
    """Session persistence and session replication for nftables L4 load balancers.

    A farm is a plain nftables ruleset file (see rulesets/) whose client->backend maps carry an
    `nftsync:` comment. `nftsync apply` loads it atomically and keeps live sessions; `nftsync
    sessions` administers those maps; `nftsync daemon` replicates them, and the farms' conntrack
    entries, to peer load balancers.

    Most commands need root (they talk to the kernel over netlink) and accept --json.
    """

