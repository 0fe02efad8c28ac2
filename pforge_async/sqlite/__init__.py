"""SQLite databases of the store: the shared actor machinery and the schema files."""
