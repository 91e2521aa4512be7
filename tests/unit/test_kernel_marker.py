"""`Replicator.after_kernel_writes`: the end of `syncing` waits for the kernel writes a peer's
snapshot caused, not only for its merge (issue 12). Real KernelWriter threads, no kernel: the
writes here are jobs that block until the test lets them go. No root."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

from nftsync.daemon.replicator import Replicator
from nftsync.daemon.writer import KernelWriter


def test_callback_waits_for_every_lane() -> None:
    async def main() -> None:
        writer = KernelWriter(asyncio.get_running_loop())
        nft_go, ct_go = threading.Event(), threading.Event()
        written: list[str] = []
        try:
            writer.submit(lambda: (nft_go.wait(10), written.append("nft")), 1000, lane="nft")
            writer.submit(lambda: (ct_go.wait(10), written.append("ct")), 10, lane="ct")
            done = asyncio.Event()
            # Only the writer is used: a Replicator's other parts need a kernel.
            Replicator.after_kernel_writes(SimpleNamespace(kernel=writer), done.set)
            await asyncio.sleep(0.2)
            assert not done.is_set() and writer.queued == 1010
            nft_go.set()
            await asyncio.sleep(0.2)
            assert not done.is_set(), "called back while the ct lane still had writes"
            ct_go.set()
            async with asyncio.timeout(10):
                await done.wait()
            assert sorted(written) == ["ct", "nft"] and writer.queued == 0
        finally:
            nft_go.set()
            ct_go.set()
            writer.close()

    asyncio.run(main())


def test_without_a_writer_at_once() -> None:
    called = []
    Replicator.after_kernel_writes(SimpleNamespace(kernel=None), lambda: called.append(1))
    assert called == [1]
