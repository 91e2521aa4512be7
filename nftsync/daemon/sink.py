"""Writing replicated state into the local kernel: the names this module used to define.

It was split into modules of one concept each; import from them in new code:

* `target`: the `KernelTarget` interface and `SinkStats`;
* `writer`: `KernelWriter`, the worker threads (lanes "nft" and "ct") the sinks write on;
* `nftsink`: `NftSink` (nft session maps, netlink batches, refusal handling and retry) and
  `NftMapTarget`; `refusals`: the causes of a refusal and what is kept for retry;
* `ctsink`: `CtSink` (conntrack through ctnetlink);
* `echo`: the BPF filter that drops our own transactions' events in the kernel.
"""

from __future__ import annotations

from .ctsink import CtSink
from .echo import attach_echo_filter, detach_echo_filter
from .nftsink import NftMapTarget, NftSink
from .refusals import EXISTS, INVALID, MAP_FULL, NO_SUCH_MAP, NO_SUCH_TABLE, OTHER
from .target import KernelTarget, SessionTarget, SinkStats
from .writer import KernelWriter

__all__ = ["EXISTS", "INVALID", "MAP_FULL", "NO_SUCH_MAP", "NO_SUCH_TABLE", "OTHER", "CtSink",
           "KernelTarget", "KernelWriter", "NftMapTarget", "NftSink", "SessionTarget",
           "SinkStats", "attach_echo_filter", "detach_echo_filter"]
