"""L7 sessions: HAProxy stick tables, followed and written as HAProxy's local peer (docs/l7.md).

`peerproto` is the sans-I/O codec of HAProxy's peers protocol (bytes in, messages out, nothing
else); `haproxy` is the asyncio session that HAProxy dials on 127.0.0.1.
"""
