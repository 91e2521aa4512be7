"""Hand-written netlink codecs for the daemon's hot paths (conntrack, nf_tables).

`core` holds the generic socket, message and attribute helpers; `ctnetlink` the conntrack
messages and `ctsocket` the conntrack event socket, dump and writer.
"""
