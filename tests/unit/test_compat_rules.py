"""Legacy farm descriptions and the iptables rules made from them, without a kernel (real traffic
through them: tests/kernel/test_compat_iptables.py)."""

from __future__ import annotations

import pytest
from builders import LEGACY_BACKENDS, LEGACY_VIP, LEGACY_VPORT, legacy_farm_dict

from nftsync.compat.iptables import (
    FarmError,
    chain_rules,
    parse_farm,
    restore_text,
)

VIP, VPORT, BACKENDS = LEGACY_VIP, LEGACY_VPORT, LEGACY_BACKENDS


# -- description ------------------------------------------------------------------------------

def test_rules_follow_the_seed() -> None:
    farm = parse_farm(legacy_farm_dict())
    text = restore_text(farm)
    assert ("-A FARM_lab -d 10.77.9.100/32 -p tcp -m multiport --dports 8080 -m recent --rcheck "
            "--seconds 120 --name _lab_0x200_sessions --mask 255.255.255.255 --rsource -j MARK "
            "--set-xmark 0x200/0xffffffff") in text
    assert ("-A FARM_lab -p tcp -m mark --mark 0x201 -m recent --set --name _lab_0x201_sessions "
            "--mask 255.255.255.255 --rsource -m comment --comment FARM_lab_1_ -j DNAT "
            "--to-destination 10.77.2.11:80") in text
    assert text.startswith("*nat\n:FARM_lab - [0:0]\n") and text.endswith("COMMIT\n")
    # Round robin for new clients: the first scheduler rule takes every 2nd, the last the rest.
    sched = [r for r in chain_rules(farm) if "0x0" in r]
    assert "--every" in sched[0] and "statistic" not in sched[-1]


@pytest.mark.parametrize("over, msg", [
    ({"name": "bad name"}, "name"),
    ({"name": "x" * 30}, "name"),
    ({"vip": "10.0.0.300"}, "vip"),
    ({"proto": "sctp"}, "proto"),
    ({"ports": list(range(1, 17))}, "ports"),
    ({"ports": ["90-80"]}, "backwards"),
    ({"ports": [0]}, "port 0"),
    ({"persistence_seconds": 0}, "persistence_seconds"),
    ({"mask": "255.0.255.0"}, "mask"),
    ({"backends": []}, "backends"),
    ({"backends": [{"mark": 0, "address": "10.0.0.1"}]}, "mark"),
    ({"backends": [{"mark": 1, "address": "10.0.0.1:99999"}]}, "port 99999"),
    ({"backends": [{"mark": 1, "address": "host:80"}]}, "IPv4"),
    ({"backends": [{"mark": 1, "address": "10.0.0.1"}, {"mark": "0x1", "address": "10.0.0.2"}]},
     "share a mark"),
    ({"colour": "blue"}, "unknown keys"),
])
def test_bad_descriptions_are_clear_errors(over: dict, msg: str) -> None:
    with pytest.raises(FarmError, match=msg):
        parse_farm(legacy_farm_dict(**over), "farm.toml")


def test_example_file_loads() -> None:
    from pathlib import Path

    from nftsync.compat.iptables import load_farm
    farm = load_farm(Path(__file__).parents[2] / "compat/farms/legacy-farm.toml")
    assert farm.table_name(farm.backends[0]) == "_MyL4Farm_0x200_sessions"


# -- lab with real traffic --------------------------------------------------------------------
