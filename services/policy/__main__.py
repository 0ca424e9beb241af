"""``python -m services.policy [serve|migrate]``."""

from runtime.cli import run_service
from services.policy.app import build_app
from services.policy.settings import PolicySettings

if __name__ == "__main__":
    run_service(name="policy", settings_cls=PolicySettings, build_app=build_app)
