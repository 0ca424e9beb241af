"""``python -m services.webhooks [serve|migrate]``."""

from runtime.cli import run_service
from services.webhooks.app import build_app
from services.webhooks.settings import WebhooksSettings

if __name__ == "__main__":
    run_service(name="webhooks", settings_cls=WebhooksSettings, build_app=build_app)
