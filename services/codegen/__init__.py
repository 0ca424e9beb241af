"""codegen: issuer keys, offline credentials, rotating tokens, trust and revocation lists."""
