"""The server: the FastAPI app, its routers, the rules (services), the SQL (db) and the board (web)."""
