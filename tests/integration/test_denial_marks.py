"""`denials.by_admin` (migration 0025) and what writes over a denial row, as a review probed it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tests.helpers import make_world


async def test_an_overseers_own_ban_over_an_expired_admin_denial_is_the_overseers_to_lift(admin, db):
    """Expired denials stay as rows (lifted lazily). A governance ban written over one — an overseer's permanent
    ban (`permanent_ban` ON CONFLICT … WHERE expires_at IS NOT NULL) or the substrate's reflexive ban (`denied`) —
    updates reason, expiry, maker and kind but not `by_admin`: the admin's old, lapsed mark makes the new ban an
    "administrative decision", and the overseer who made it is refused its lift (403 "denied by an admin").
    ADR 0029 says a ban that replaces an admin's *expiring* denial keeps the mark; this one had expired."""
    w = await make_world(admin)
    await admin.post("/v1/families", {"key": "ovs", "features": ["seat:overseer"]}, 201)
    ovs = await w.agent("ovs")
    soon = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    await admin.post("/v1/families/cheap/denials", {"feature": "role:dev", "reason": "budget", "expires_at": soon},
                     201)
    await db.execute("UPDATE denials SET expires_at = now() - interval '1 minute' WHERE family_key = 'cheap'")
    # The admin's denial is over. An overseer bans the family from role:dev for its own reasons, then lifts it.
    await ovs.post("/v1/governance/bans", {"family": "cheap", "feature": "role:dev", "reason": "sloppy"}, 201)
    row = await db.fetchrow("SELECT governance, created_by, by_admin FROM denials WHERE family_key = 'cheap'")
    assert row["governance"] == "permanent" and row["created_by"] == ovs.sub
    r = await ovs.call("POST", "/v1/governance/lifts", {"family": "cheap", "feature": "role:dev", "reason": "ok"})
    assert r.status_code == 200, (dict(row), r.status_code, r.text)
