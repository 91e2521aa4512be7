"""The sync daemon: learns sessions and conntrack entries locally and replicates them to peers."""
