"""The local certificate authority: creating and loading its key and certificate (`authority`),
minting per-host leaf certificates from it (`mint`), caching them per host (`store`), and the
`httpsdump ca` subcommands (`commands`). All certificate work uses M2Crypto."""

from __future__ import annotations

from ca.authority import CA, CA_CERT, CA_CERT_DER, CA_KEY, load, load_or_create
from ca.mint import cert_to_pem, mint, new_leaf_key, random_serial
from ca.store import LeafStore, StoreStats

__all__ = [
    "CA",
    "CA_CERT",
    "CA_CERT_DER",
    "CA_KEY",
    "LeafStore",
    "StoreStats",
    "cert_to_pem",
    "load",
    "load_or_create",
    "mint",
    "new_leaf_key",
    "random_serial",
]
