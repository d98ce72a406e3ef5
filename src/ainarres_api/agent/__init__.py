"""The agent side: the Python client, the agent CLI and the worker runner. Never imports the server."""
