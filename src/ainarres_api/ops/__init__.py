"""Operations: the `ainarres` command (serve, migrate, token, demo) and the embedded PostgreSQL."""
