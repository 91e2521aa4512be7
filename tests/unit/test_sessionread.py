"""The pure parts of `sessions get|list` without a kernel: the --client prefix test on raw key
bytes, key bytes to text, and the one-key GETSETELEM request's layout.
Against the kernel: tests/kernel/test_sessions_cli.py."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from nftsync.datatypes import join_concat
from nftsync.errors import SessionError
from nftsync.netlink.core import NLMSG_HDRLEN, iter_attrs, iter_messages
from nftsync.netlink.nftables import (
    NFTA_SET_ELEM_LIST_ELEMENTS,
    NFTA_SET_ELEM_LIST_SET,
    NFTA_SET_ELEM_LIST_TABLE,
)
from nftsync.netlink.setget import get_request
from nftsync.sessionread import ClientPrefix, key_text


@pytest.mark.parametrize("prefix, inside, outside", [
    ("10.10.0.0/16", ["10.10.0.0", "10.10.255.255", "10.10.7.1"], ["10.11.0.0", "10.9.255.255"]),
    ("10.64.8.0/21", ["10.64.8.0", "10.64.15.255"], ["10.64.7.255", "10.64.16.0"]),
    ("10.64.3.77/24", ["10.64.3.0", "10.64.3.255"], ["10.64.4.0"]),  # host bits dropped
    ("10.1.2.3", ["10.1.2.3"], ["10.1.2.2", "10.1.2.4"]),
    ("0.0.0.0/0", ["0.0.0.0", "255.255.255.255"], []),
    ("fd00:10::/64", ["fd00:10::1", "fd00:10::ffff:ffff:ffff:ffff"], ["fd00:11::1"]),
])
def test_client_prefix_matches_raw_keys(prefix: str, inside: list[str], outside: list[str]):
    p = ClientPrefix.parse(prefix)
    match = p.matcher()
    for addr in inside + outside:
        raw = ipaddress.ip_address(addr).packed
        assert match(raw) is (addr in inside), addr
        # a composite key (address . port) is matched on its first component
        assert match(raw + b"\x9c\x40\0\0") is (addr in inside), addr


def test_client_prefix_refuses_what_is_not_an_address():
    for text in ("10.10.1.7,40000", "10.0.0.0/33", "web", ""):
        with pytest.raises(SessionError, match="not an address or prefix"):
            ClientPrefix.parse(text)


def test_key_text_is_what_parse_key_accepts():
    assert key_text(("ipv4_addr",))(socket.inet_aton("10.1.2.3")) == "10.1.2.3"
    assert key_text(("ipv6_addr",))(ipaddress.IPv6Address("fd00::1").packed) == "fd00::1"
    types = ("ipv4_addr", "inet_service")
    assert key_text(types)(join_concat(["10.1.2.3", "40000"], types)) == "10.1.2.3 . 40000"
    types = ("ipv4_addr", "inet_proto", "mark")
    assert key_text(types)(join_concat(["10.1.2.3", "6", "0x201"], types)) == \
        "10.1.2.3 . tcp . 513"


def test_get_request_names_one_key():
    key = socket.inet_aton("10.1.2.3")
    msg = get_request(2, "nftsync_web", "web_sessions", key, seq=77)
    [(mtype, flags, seq, _pid, payload)] = list(iter_messages(msg))
    assert mtype == (10 << 8) | 13 and seq == 77  # NFNL_SUBSYS_NFTABLES, NFT_MSG_GETSETELEM
    assert flags == 0x01 | 0x04  # NLM_F_REQUEST | NLM_F_ACK: not a dump
    attrs = {t: bytes(v) for t, _n, v in iter_attrs(payload[4:])}
    assert attrs[NFTA_SET_ELEM_LIST_TABLE] == b"nftsync_web\0"
    assert attrs[NFTA_SET_ELEM_LIST_SET] == b"web_sessions\0"
    assert attrs[NFTA_SET_ELEM_LIST_ELEMENTS].endswith(key)  # one element holding the key
    assert len(msg) == NLMSG_HDRLEN + len(payload)
