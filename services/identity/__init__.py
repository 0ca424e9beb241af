"""The identity service: tenants, members and their media, partner API clients and the
directory change feed. ``servicer`` is the wire, ``domain`` the rules, ``store`` the SQL and
``importer`` the CSV import."""
