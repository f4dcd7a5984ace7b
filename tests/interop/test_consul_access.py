"""py-consul with meshpilot's scoped access tokens as Consul ACL tokens: a read token discovers but
cannot register, a write token registers, ``acl.token.read_self`` describes the token, and a token
revoked through the management API is refused at once."""

from __future__ import annotations

import consul
import pytest

from tests.support import control_plane, http, tmpdir

BOOT = "b00t-s3cret"


def test_scoped_tokens_through_py_consul() -> None:
    with control_plane(tmpdir("meshpilot-consul-access-"), extra=["--consul-port", "0", "--token", BOOT]) as cp:
        admin = {"Authorization": f"Bearer {BOOT}"}
        status, reader, _ = http("POST", f"{cp.api}/v1/access/tokens", {"scope": "read", "description": "billing"}, admin)
        assert status == 201, f"creating a read token: got {status} {reader}"
        status, writer, _ = http("POST", f"{cp.api}/v1/access/tokens", {"scope": "write"}, admin)
        assert status == 201, f"creating a write token: got {status} {writer}"
        port = cp.ports["consul"]
        read_client = consul.Consul(host="127.0.0.1", port=port, token=reader["secret"])
        write_client = consul.Consul(host="127.0.0.1", port=port, token=writer["secret"])
        with pytest.raises(consul.ACLPermissionDenied):
            read_client.agent.service.register("billing", port=8080)
        assert write_client.agent.service.register("billing", port=8080)
        assert "billing" in read_client.catalog.services()[1], "a read token discovers"
        me = read_client.acl.token.read_self()
        assert me["AccessorID"] == reader["id"] and me["Description"] == "billing", f"got {me}"
        assert [p["Name"] for p in me["Policies"]] == ["meshpilot-read"], f"expected the policy to name the scope, got {me['Policies']}"
        status, _, _ = http("DELETE", f"{cp.api}/v1/access/tokens/{reader['id']}", None, admin)
        assert status == 200
        with pytest.raises(consul.ACLPermissionDenied):
            read_client.catalog.services()
