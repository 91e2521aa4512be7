"""nftsync: session persistence and replication for nftables L4 load balancers."""

__version__ = "0.1.0"
