"""`python -m nftsync` runs the CLI (used inside network namespaces by the tests and the lab)."""

from nftsync.cli import main

main()
