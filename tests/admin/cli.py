"""Running onecard-admin in the test's process, as the operator, against the services a test started."""
from __future__ import annotations

import io
import json
from typing import Any

from onecard_admin.cli import run
from onecard_admin.settings import SERVICE_NAMES, AdminSettings
from tests.mesh import nats_seed, pki


def admin_settings(nats_url: str, **targets: str) -> AdminSettings:
    values: dict[str, Any] = {f"{name}_target": "" for name in SERVICE_NAMES}
    values.update({f"{name}_target": target for name, target in targets.items()})
    return AdminSettings(tls_dir=pki().tls_dir("ops"), nats_seed=nats_seed("ops"), nats_url=nats_url, **values)


async def admin(settings: AdminSettings, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = await run(list(argv), settings=settings, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


async def admin_json(settings: AdminSettings, *argv: str) -> tuple[int, dict[str, Any]]:
    code, out, err = await admin(settings, "--json", *argv)
    assert out, err
    return code, json.loads(out)
