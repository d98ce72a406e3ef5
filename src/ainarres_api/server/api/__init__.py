"""HTTP routers: parse input, resolve the caller, call one service function, shape the response."""
