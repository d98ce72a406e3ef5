"""The SQL layer: named statements, typed rows, and asyncpg errors translated by constraint name."""
