"""Evaluate a ruleset file in a throw-away network namespace and print what it produces.

Run as `unshare --net python -m nftsync.isolated FILE` by `nftsync.ruleset.evaluate_file`. In an
empty namespace the file yields exactly the objects it declares, normalised by the same libnftables
that will load it for real, so its tables, chains and maps can be compared with the kernel's without
writing a parser for nft syntax (defines, includes, variables all just work).

Output on stdout, one JSON document: {"text": terse stateless listing, and "maps", "sets",
"chains" as JSON}.
On failure, libnftables' error text on stderr and exit status 2.
"""

from __future__ import annotations

import json
import sys

import nftables


def main(path: str) -> int:
    ctx = nftables.Nftables()
    rc, _out, err = ctx.cmd_from_file(path)
    if rc != 0:
        sys.stderr.write(err)
        return 2
    ctx.set_terse_output(True)
    ctx.set_stateless_output(True)
    rc, text, err = ctx.cmd("list ruleset")
    if rc != 0:
        sys.stderr.write(err)
        return 2
    ctx.set_terse_output(False)
    ctx.set_json_output(True)
    doc: dict[str, object] = {"text": text}
    for kind in ("maps", "sets", "chains"):
        rc, out, err = ctx.cmd(f"list {kind}")
        if rc != 0:
            sys.stderr.write(err)
            return 2
        objs = json.loads(out)["nftables"] if out.strip() else []
        doc[kind] = [o for o in objs if "metainfo" not in o]
    json.dump(doc, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
