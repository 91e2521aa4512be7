"""nftables session maps through libnftables, for the CLI and `apply` (`nftmap`), and the one
builder of nft element text.

The daemon writes replicated changes through `nftsync.daemon.target.KernelTarget` instead: one
interface for nft session maps, legacy xt_recent tables and conntrack.
"""
