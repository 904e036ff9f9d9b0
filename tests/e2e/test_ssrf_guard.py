"""Label Studio keeps its own SSRF guard on and still reaches the backend (README, "Connect it to Label Studio"):
only the backend's network is unbanned, so the webhook Label Studio creates for the model is accepted while
other private addresses stay refused."""
from __future__ import annotations

import pytest

from .backend_process import BackendProcess
from .label_studio import LabelStudio

pytestmark = pytest.mark.e2e

# Label Studio 1.23.2's default banned subnets (core/utils/io.py: validate_ip)
DEFAULT_BANNED = (
    "0.0.0.0/8,10.0.0.0/8,100.64.0.0/10,127.0.0.0/8,169.254.0.0/16,172.16.0.0/12,192.0.0.0/24,192.0.2.0/24,"
    "192.88.99.0/24,192.168.0.0/16,198.18.0.0/15,198.51.100.0/24,203.0.113.0/24,224.0.0.0/4,233.252.0.0/24,"
    "240.0.0.0/4,255.255.255.255/32,::/128,::1/128,::ffff:0:0/96,::ffff:0:0:0/96,64:ff9b::/96,64:ff9b:1::/48,"
    "100::/64,2001:0000::/32,2001:20::/28,2001:db8::/32,2002::/16,fc00::/7,fe80::/10,ff00::/8").split(",")
CONFIG = """<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">
  <Label value="circle"/></RectangleLabels></View>"""


def webhook_urls(ls, project: int) -> list[str]:
    return [hook["url"] for hook in ls.api("GET", "/api/webhooks/", params={"project": project})]


def test_label_studio_with_its_ssrf_guard_on_still_creates_the_backend_webhook(tmp_path):
    guarded = {"SSRF_PROTECTION_ENABLED": "true", "USE_DEFAULT_BANNED_SUBNETS": "false",
               "USER_ADDITIONAL_BANNED_SUBNETS": ",".join(n for n in DEFAULT_BANNED if n != "127.0.0.0/8")}
    with LabelStudio(tmp_path / "ls", env=guarded) as ls, \
            BackendProcess(tmp_path / "backend", env={"URL_SECRET": "s3cret"}) as backend:
        project = ls.create_project("guarded", CONFIG)["id"]
        ls.connect_ml_backend(project, backend.url + "/s3cret")
        assert webhook_urls(ls, project) == [backend.url + "/s3cret/webhook"]
        refused = ls.request("POST", "/api/webhooks/", json={"project": project, "url": "http://10.0.0.1/hook"})
        assert refused.status_code == 403 and "reserved network address" in refused.text   # guard still on
