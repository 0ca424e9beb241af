"""``python -m gateway`` as a real process: it serves from ONECARD_* settings (REST, and the partner
gRPC API on its TLS port), logs JSON lines, never logs a secret, a token or an Authorization header,
and stops cleanly on SIGTERM."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import grpc
import httpx

from devstack.servers import free_port
from gateway.auth import MEMBERS_READ
from onecard.identity.v1 import identity_pb2 as pb
from onecard.partner.v1 import partner_pb2, partner_pb2_grpc
from runtime.mesh import MeshTLS
from tests.mesh import service_values
from tests.gateway.conftest import TOKEN_SECRET

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0


async def wait_until_ready(base_url: str, process: asyncio.subprocess.Process) -> None:
    deadline = asyncio.get_running_loop().time() + START_TIMEOUT_S
    async with httpx.AsyncClient(base_url=base_url) as http:
        while True:
            assert process.returncode is None, "the gateway exited while starting"
            try:
                if (await http.get("/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert asyncio.get_running_loop().time() < deadline, "the gateway did not start"
            await asyncio.sleep(0.1)


async def test_python_m_gateway_serves_logs_json_and_never_logs_secrets(identity: Any, codegen_service: Any,
                                                                         tmp_path: Path) -> None:
    tenant = (await identity.stub.CreateTenant(pb.CreateTenantRequest(name="Process U", kind=pb.TENANT_KIND_UNIVERSITY,
                                                                      time_zone="Asia/Shanghai",
                                                                      currency="CNY"))).tenant
    created = await identity.stub.CreateApiClient(pb.CreateApiClientRequest(
        name="p", scopes=[MEMBERS_READ], grants=[pb.TenantGrant(tenant_id=tenant.tenant_id, scopes=[MEMBERS_READ])]))
    client_id, client_secret = created.client.client_id, created.client_secret
    port = free_port()
    partner_port = free_port()
    log_path = tmp_path / "gateway.log"
    env = {
        **os.environ,
        "ONECARD_IDENTITY_TARGET": identity.target,
        # /readyz answers 200 only when every upstream serves, so the process gets a real codegen.
        "ONECARD_CODEGEN_TARGET": codegen_service.target,
        "ONECARD_TOKEN_SECRET": TOKEN_SECRET,
        "ONECARD_HTTP_HOST": "127.0.0.1",
        "ONECARD_HTTP_PORT": str(port),
        "ONECARD_PARTNER_GRPC_PORT": str(partner_port),
        "ONECARD_LOG_LEVEL": "info",
        "ONECARD_TLS_DIR": str(service_values("gateway")["tls_dir"]),
    }
    with log_path.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", env=env, stdout=log_file, stderr=log_file
        )
        try:
            base_url = f"http://127.0.0.1:{port}"
            await wait_until_ready(base_url, process)
            async with httpx.AsyncClient(base_url=base_url) as http:
                form = await http.post("/v1/oauth/token", data={"grant_type": "client_credentials",
                                                                 "tenant_id": tenant.tenant_id,
                                                                 "client_id": client_id,
                                                                 "client_secret": client_secret})
                basic_value = base64.b64encode(f"{client_id}:{client_secret}".encode()).decode()
                basic = await http.post("/v1/oauth/token", data={"grant_type": "client_credentials",
                                                                  "tenant_id": tenant.tenant_id},
                                        headers={"Authorization": f"Basic {basic_value}"})
                token = form.json()["access_token"]
                fetched = await http.get(f"/v1/tenants/{tenant.tenant_id}",
                                         headers={"Authorization": f"Bearer {token}", "X-Request-Id": "proc-1"})
                refused = await http.get(f"/v1/tenants/{tenant.tenant_id}",
                                         headers={"Authorization": "Bearer not.a.token"})
                ready = await http.get("/readyz")
            ca_pem = MeshTLS.load(service_values("gateway")["tls_dir"]).ca_pem
            async with grpc.aio.secure_channel(f"localhost:{partner_port}",
                                               grpc.ssl_channel_credentials(root_certificates=ca_pem)) as channel:
                members = await partner_pb2_grpc.PartnerServiceStub(channel).SearchMembers(
                    partner_pb2.SearchMembersRequest(tenant_id=tenant.tenant_id),
                    metadata=(("authorization", f"Bearer {token}"), ("x-request-id", "proc-2")), timeout=10)
        finally:
            process.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)

    assert (form.status_code, basic.status_code, fetched.status_code, ready.status_code) == (200, 200, 200, 200)
    assert refused.status_code == 401
    log_text = log_path.read_text()
    # uvicorn re-raises SIGTERM once it has shut down gracefully, so the exit says "terminated";
    # that the shutdown was graceful shows in the lifespan's last line.
    assert code in (0, -signal.SIGTERM), log_text[-2000:]
    assert '"gateway stopped"' in log_text
    for secret in (client_secret, token, basic_value, TOKEN_SECRET, "not.a.token", "Bearer"):
        assert secret not in log_text
    lines = [json.loads(line) for line in log_text.splitlines() if line.startswith("{")]
    requests = [line for line in lines if line.get("event") == "http request"]
    assert {"route": "/v1/tenants/{tenant_id}", "status": 200, "request_id": "proc-1"}.items() <= next(
        line for line in requests if line.get("request_id") == "proc-1").items()
    assert all(line["service"] == "gateway" for line in lines)
    assert list(members.members) == []
    calls = [line for line in lines if line.get("event") == "grpc request"]
    assert {"grpc_method": "SearchMembers", "grpc_status": "OK", "request_id": "proc-2",
            "client_id": client_id}.items() <= calls[0].items()
    assert tenant.tenant_id not in "".join(json.dumps(line.get("route")) for line in requests)
