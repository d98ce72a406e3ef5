"""Configuration, read from AINARRES_* environment variables at the entry point."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything the service can be told; built once by the entry point and passed down."""

    model_config = SettingsConfigDict(env_prefix="AINARRES_", extra="ignore")

    database_url: str | None = None
    # How long a statement waits for a row lock held by another transaction (then 503, Retry-After), and
    # how long any statement may run (a guard's JSONPath included); 0 disables either.
    lock_timeout_ms: int = Field(default=2000, ge=0)
    statement_timeout_ms: int = Field(default=10_000, ge=0)
    data_dir: Path = Path(".ainarres")
    host: str = "127.0.0.1"
    port: int = 8080

    jwt_algorithm: Literal["HS256", "RS256"] = "HS256"
    jwt_secret: SecretStr | None = None
    # The secret read from a file instead (a compose or Kubernetes secret, e.g. /run/secrets/jwt-secret);
    # surrounding whitespace is dropped. Setting both is refused.
    jwt_secret_file: Path | None = None
    jwt_private_key_file: Path | None = None
    jwt_public_key_file: Path | None = None
    jwt_issuer: str = "ainarres"
    jwt_audience: str = "ainarres"
    token_ttl_seconds: int = Field(default=3600, ge=60, le=365 * 86400)
    admin_token_ttl_seconds: int = Field(default=30 * 86400, ge=60, le=365 * 86400)
    # false: the first start makes the admin family but prints no token (a container's stdout is its log driver's,
    # and a 30-day admin token has no business there); mint one with `ainarres token --family admin`.
    bootstrap_token: bool = True
    leeway_seconds: int = Field(default=5, ge=0, le=60)

    pool_min_size: int = Field(default=2, ge=1)
    pool_max_size: int = Field(default=10, ge=1)
    pgbouncer: bool = False
    # LISTEN needs a session of its own: through a pooler in transaction mode it would be lost, so
    # point this at PostgreSQL directly when database_url goes through PgBouncer (default: database_url).
    listen_database_url: str | None = None
    # Long-poll claims: changes are told to other replicas in one NOTIFY per window; a sweep every
    # few seconds covers lost notifications and writes made outside the service.
    notify_coalesce_ms: float = Field(default=5, ge=0, le=1000)
    wake_sweep_seconds: float = Field(default=3, gt=0, le=300)

    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    max_payload_bytes: int = Field(default=65_536, ge=256)
    max_feature_sets: int = Field(default=64, ge=1, le=1000)
    # Distinct required_features sets task creates may use per lane (each is a queue claims probe).
    max_required_sets_per_lane: int = Field(default=1000, ge=1, le=100_000)
    # One event's note (or reason) and artifacts together, as stored (413 above it); every entry point
    # checks it (api/verbs.py `run`).
    max_event_bytes: int = Field(default=16_384, ge=1024, le=1_048_576)
    # A page of events (feed, stream batch, a task's events) stops early, with its cursor, past this.
    max_read_bytes: int = Field(default=1_048_576, ge=65_536)

    # At the door (uvicorn, `ainarres serve`; see server/limits.py and docs/operations.md "Limits").
    http_max_header_bytes: int = Field(default=16_384, ge=1024, le=1_048_576)
    http_header_timeout_seconds: float = Field(default=10, gt=0, le=600)
    http_body_timeout_seconds: float = Field(default=30, gt=0, le=3600)
    http_keepalive_seconds: int = Field(default=5, ge=1, le=600)
    http_max_concurrency: int = Field(default=1000, ge=0)  # 0: no limit
    # Requests per second per agent (a token's sub; unauthenticated: per client address), per process.
    rate_limit_per_second: float = Field(default=200, ge=0)  # 0: no limit
    rate_limit_burst: int = Field(default=2000, ge=1)
    # Per agent (its token's sub): waiting claims (long polls) at once, per process; open MCP sessions, exact
    # across every process (they are rows); an MCP session idle this long is gone; at most this many MCP
    # sessions open in all (checked, not serialised across agents).
    max_long_polls_per_agent: int = Field(default=4, ge=1)
    mcp_sessions_per_agent: int = Field(default=8, ge=1)
    mcp_session_idle_seconds: float = Field(default=300, gt=0)
    mcp_max_sessions: int = Field(default=10_000, ge=1)

    # `ainarres serve`: API worker processes on one socket (and one database); and the graceful drain on
    # SIGTERM (readiness 503 at once, waiting claims answered, streams closed, in-flight requests given at
    # most this long to finish, then exit 0). See docs/operations.md "Several processes" and "Drain".
    workers: int = Field(default=1, ge=1, le=256)
    drain_seconds: float = Field(default=20, ge=0, le=3600)

    log_level: str = "info"

    @model_validator(mode="after")
    def _secret_from_file(self) -> Settings:
        if self.jwt_secret_file is not None:
            if self.jwt_secret is not None:
                raise ValueError("set AINARRES_JWT_SECRET or AINARRES_JWT_SECRET_FILE, not both")
            try:
                text = self.jwt_secret_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ValueError(f"AINARRES_JWT_SECRET_FILE: cannot read {self.jwt_secret_file}: {exc.strerror}") \
                    from exc
            if not text:
                raise ValueError(f"AINARRES_JWT_SECRET_FILE: {self.jwt_secret_file} is empty")
            self.jwt_secret = SecretStr(text)
        return self
