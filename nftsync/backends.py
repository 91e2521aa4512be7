"""Backend states: up, drain, down.

The farm's scheduler chain ends with `meta mark set meta mark map @<states map>`: a new client whose
scheduled backend is listed in the states map is handed to the listed replacement instead. nftsync
owns that map's elements; each element's comment records the state (`drain` or `down`). So:

- up: not in the map; gets new clients from the scheduler.
- drain: in the map, replaced by an up backend for *new* clients; its sessions and established
  connections stay (the session lookup comes before the scheduler).
- down: like drain, and in the same transaction its sessions are removed from the farm's session
  map, so its clients re-balance on their next connection; its conntrack entries are deleted too, so
  half-dead connections fail fast instead of hanging.

Replacements are spread round-robin over the up backends, so with a hash scheduler only the
unavailable backend's clients move. With no backend up, a drained backend keeps its clients, and a
down one is replaced by mark 0:
such clients are not balanced at all.
"""

from __future__ import annotations

import os

from nftsync.errors import KernelError, NftsyncError, SessionError
from nftsync.model import BackendState, Farm, Role
from nftsync.netlink.ctsocket import CtWriter, dump
from nftsync.nft import Nft
from nftsync.tables.nftmap import NftSessionMap, element_commands, element_text


def replacements(backends: dict[int, str], states: dict[int, BackendState]) -> dict[int, int]:
    """Mark -> replacement mark for every backend that is not up."""
    up = sorted(m for m in backends if states.get(m, BackendState.UP) is BackendState.UP)
    drained = sorted(m for m, s in states.items() if s is BackendState.DRAIN and m in backends)
    out: dict[int, int] = {}
    for i, mark in enumerate(sorted(m for m in states if m in backends)):
        if up:
            out[mark] = up[i % len(up)]
        elif states[mark] is BackendState.DRAIN:
            out[mark] = mark
        else:
            out[mark] = drained[i % len(drained)] if drained else 0
    return out


def states_commands(farm: Farm, states: dict[int, BackendState]) -> list[str]:
    """Commands that rewrite the farm's states map to `states` (one transaction with the rest)."""
    ref = farm.require(Role.STATES).ref
    where = f"{ref.family} {ref.table} {ref.name}"
    elems = [element_text(f"{mark:#x}", f"{target:#x}", comment=states[mark].value)
             for mark, target in sorted(replacements(farm.backends, states).items())]
    return [f"flush map {where}", *element_commands(where, add=elems)]


def set_state(farm: Farm, mark: int, state: BackendState, nft: Nft | None = None) -> dict:
    """Change one backend's state atomically; returns what was done, for the CLI to print."""
    nft = nft or Nft()
    if mark not in farm.backends:
        known = ", ".join(f"{m:#x}" for m in sorted(farm.backends)) or "none"
        raise SessionError(f"farm {farm.name!r} has no backend {mark:#x} (backends: {known})")
    states = dict(farm.states)
    if state is BackendState.UP:
        states.pop(mark, None)
    else:
        states[mark] = state
    cmds = states_commands(farm, states)
    removed = 0
    if state is BackendState.DOWN and Role.SESSIONS in farm.maps:
        # Timed sessions only: static pins are the operator's decision (`sessions del --static`).
        table = NftSessionMap(farm.maps[Role.SESSIONS], nft)
        keys = [s.key for s in table.list() if s.mark == mark]
        removed = len(keys)
        cmds += table.commands(delete=keys)
    nft.cmd("\n".join(cmds), what=f"set backend {mark:#x} of farm {farm.name} {state.value}")
    flushed = flush_conntrack(mark) if state is BackendState.DOWN else 0
    return {"farm": farm.name, "backend": f"{mark:#x}", "address": farm.backends[mark],
            "state": state.value, "sessions_removed": removed, "connections_removed": flushed}


def flush_conntrack(mark: int) -> int:
    """Delete the conntrack entries of a backend (ct mark exactly `mark`, IPv4 and IPv6) over
    ctnetlink; returns how many went.

    Dump + delete, as `conntrack -D -m` does: the kernel filters the dump by mark
    (CTA_MARK/CTA_MARK_MASK), and `CtWriter` deletes the entries by tuple in batches. The
    kernel's filtered flush (a DELETE without tuple) would be one message but says nothing of
    how many it removed. An entry that ends between the dump and its delete is not counted."""
    try:
        with CtWriter() as writer:
            result = writer.apply(("delete", ct) for ct in dump(mark=mark))
    except (NftsyncError, OSError) as exc:
        raise KernelError(f"deleting the connections of backend {mark:#x}: {exc}") from exc
    if result.failed:
        _op, ct, err = result.failed[0]
        raise KernelError(f"deleting the connections of backend {mark:#x}: {ct}: "
                          f"{os.strerror(err)} ({len(result.failed)} not deleted)")
    return result.deleted
