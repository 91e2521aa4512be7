"""The legacy path: iptables `recent` farms (the seed talk's MARK + DNAT scheme) on older kernels.

- `xtrecent`: /proc/net/xt_recent tables as session tables (stock and patched kernels).
- `procfmt`: the /proc text, parsed exactly (RecentEntry) and host-independent (RecentSession).
- `probe`: whether the kernel has compat/kernel's `*addr;ttl;stamps;` command.
- `clock`: jiffies <-> seconds, HZ detection.
- `iptables`: the legacy farm rules, generated from a small TOML/JSON description and applied
  atomically with iptables-restore --noflush.

Adapters only: moving a legacy farm to nftables is a use case, `nftsync.migrate`.
"""
