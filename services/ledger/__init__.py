"""The ledger: double-entry accounts and immutable transfers in integer fen (docs/ledger.md)."""
