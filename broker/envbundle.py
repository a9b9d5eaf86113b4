"""``wif-broker env``: the environment app containers need (SPEC §6)."""

from __future__ import annotations

import json
import shlex

from broker.settings import Address

FORMATS = ("sh", "k8s", "ecs")


def bundle(address: Address) -> dict[str, str]:
    host = "127.0.0.1" if address.host in ("0.0.0.0", "::", "") else address.host
    target = str(Address(host, address.port))
    no_proxy = f"{host},localhost,metadata.google.internal,169.254.169.254"
    return {
        # Python/Go/Node/Java/.NET data calls; Go treats it as "on GCE".
        "GCE_METADATA_HOST": target,
        # Python's detection ping and Node's probe use only this one.
        "GCE_METADATA_IP": target,
        # gcloud reads only this one.
        "GCE_METADATA_ROOT": target,
        # gax-dotnet's fallback.
        "METADATA_EMULATOR_HOST": target,
        # A proxy hop would add X-Forwarded-For, which the broker refuses.
        "NO_PROXY": no_proxy,
        # wget and some HTTP libraries read only the lowercase name.
        "no_proxy": no_proxy,
    }


def render(address: Address, fmt: str) -> str:
    env = bundle(address)
    if fmt == "sh":
        # Quoted: an IPv6 address in brackets is a glob pattern to the shell.
        return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
    if fmt == "k8s":
        return "env:\n" + "".join(f"- name: {k}\n  value: {json.dumps(v)}\n" for k, v in env.items())
    return json.dumps([{"name": k, "value": v} for k, v in env.items()], indent=2) + "\n"
