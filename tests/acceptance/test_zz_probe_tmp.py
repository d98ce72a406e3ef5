from tests.helpers import make_world

async def test_probe(admin, client):
    w = await make_world(admin)
    dev = await w.agent("cheap")
    t = (await dev.create("dev", "x"))["task"]
    c = await dev.claim("dev")
    lease = c["lease"]["id"]
    h = {"Authorization": f"Bearer {dev.token}"}
    ah = {"Authorization": f"Bearer {admin.token}"}
    cases = [
        ("POST", "/v1/tasks", h, {"content": b"\xff\xfe", "headers": {**h, "content-type": "application/json"}}),
        ("POST", "/v1/tasks", h, {"content": b"[" * 200000, "headers": {**h, "content-type": "application/json"}}),
        ("POST", "/v1/tasks", h, {"content": b'{"lane":"dev","title":"x","payload":{"a":NaN}}', "headers": {**h, "content-type": "application/json"}}),
        ("POST", "/v1/tasks", h, {"content": b'{"lane":"dev","title":"\\ud800"}', "headers": {**h, "content-type": "application/json"}}),
        ("POST", "/v1/tasks", h, {"content": b'{"lane":"dev","title":"a\\u0000b"}', "headers": {**h, "content-type": "application/json"}}),
        ("POST", "/v1/tasks", h, {"content": b'{"lane":"dev","title":"ab","payload":{"k":"\\u0000"}}', "headers": {**h, "content-type": "application/json"}}),
        ("POST", "/v1/tasks", h, {"content": b'{"lane":"dev","title":"ab","payload":{"k\\u0000":"x"}}', "headers": {**h, "content-type": "application/json"}}),
        ("POST", "/v1/tasks", h, {"content": b'{"lane":"dev","title":"ab","payload":{"k":"\\ud800"}}', "headers": {**h, "content-type": "application/json"}}),
        ("POST", "/v1/tasks", h, {"content": ('{"lane":"dev","title":"ab","payload":' + '{"a":' * 5000 + '1' + '}' * 5001 + '}').encode(), "headers": {**h, "content-type": "application/json"}}),
        ("POST", "/v1/tasks", h, {"content": ('{"lane":"dev","title":"ab","payload":' + '{"a":' * 900 + '1' + '}' * 901 + '}').encode(), "headers": {**h, "content-type": "application/json"}}),
        ("POST", "/v1/tasks", h, {"content": b'{"lane":"dev","title":"ab","payload":{"k":1e400}}', "headers": {**h, "content-type": "application/json"}}),
        ("POST", "/v1/tasks", h, {"content": b'{"lane":"dev","title":"ab","payload":{"k":123456789012345678901234567890123456789}}', "headers": {**h, "content-type": "application/json"}}),
        ("POST", "/v1/tasks", h, {"content": b'{"lane":"dev","title":"ab","idempotency_key":"\\u0000"}', "headers": {**h, "content-type": "application/json"}}),
        ("POST", "/v1/tasks", h, {"content": b'{"lane":"d\\u0000ev","title":"ab"}', "headers": {**h, "content-type": "application/json"}}),
        ("POST", f"/v1/tasks/{t['id']}/progress", h, {"content": ('{"lease":"%s","note":"a\\u0000b"}' % lease).encode(), "headers": {**h, "content-type": "application/json"}}),
        ("POST", f"/v1/tasks/{t['id']}/progress", h, {"content": ('{"lease":"%s","note":"ok","artifacts":[{"type":"x","name":"\\u0000"}]}' % lease).encode(), "headers": {**h, "content-type": "application/json"}}),
        ("POST", "/v1/tasks", h, {"content": b"lane=dev", "headers": {**h, "content-type": "text/plain"}}),
        ("POST", "/v1/tasks", h, {"content": b"", "headers": {**h, "content-type": "application/json"}}),
        ("POST", "/v1/tasks", h, {"content": b"null", "headers": {**h, "content-type": "application/json"}}),
        ("POST", "/v1/tasks", h, {"content": b"x" * 2_000_000, "headers": {**h, "content-type": "application/json", "content-length": "10"}}),
        ("GET", f"/v1/tasks/{t['id']}/events?after=100000000000000000000000", h, {}),
        ("GET", f"/v1/tasks/{t['id']}/events?after=9223372036854775808", h, {}),
        ("GET", "/v1/workflows/dev?version=100000000000000", ah, {}),
        ("GET", "/v1/features?limit=-1", ah, {}),
        ("GET", "/v1/features?after=%00", ah, {}),
        ("GET", "/v1/features/%00", ah, {}),
        ("GET", "/v1/families/%00", ah, {}),
        ("GET", "/v1/features?kind=%00", ah, {}),
        ("GET", "/v1/tokens?family=%00", ah, {}),
        ("DELETE", "/v1/families/%00/denials/%00", ah, {}),
        ("POST", "/v1/families", ah, {"json": {"key": "f1", "description": "a\u0000"}}),
        ("POST", "/v1/features", ah, {"json": {"name": "role:x", "description": "a\u0000"}}),
        ("POST", "/v1/projects", ah, {"json": {"slug": "p", "context": {"a": "\u0000"}}}),
        ("POST", "/v1/families/cheap/denials", ah, {"json": {"feature": "role:dev", "reason": "a", "expires_at": "9999-12-31T23:59:59"}}),
        ("POST", "/v1/families/cheap/denials", ah, {"json": {"feature": "role:dev", "reason": "a", "expires_at": "0001-01-01T00:00:00Z"}}),
        ("POST", "/v1/families/cheap/denials", ah, {"json": {"feature": "role:dev", "reason": "a\u0000"}}),
        ("POST", "/v1/tokens", ah, {"json": {"family": "\u0000"}}),
        ("POST", "/v1/workflows", ah, {"json": {"key": "w", "stages": [{"key": "a", "initial": True}, {"key": "b", "terminal": True}], "transitions": [{"from": "a", "to": "b", "kind": "advance", "guard": "$$$ bad"}]}}),
        ("POST", "/v1/workflows", ah, {"json": {"key": "w", "stages": [{"key": "a", "initial": True, "instructions": "\u0000"}, {"key": "b", "terminal": True}]}}),
        ("DELETE", "/v1/tasks", h, {}),
        ("POST", "/v1/claims", h, {"json": {"wait_seconds": "nan"}}),
    ]
    for m, p, hd, kw in cases:
        if "headers" not in kw:
            kw = {**kw, "headers": hd}
        r = await client.request(m, p, **kw)
        print(m, p[:60], (kw.get("content") or b"")[:60], "→", r.status_code, r.headers.get("content-type"), r.text[:200])
