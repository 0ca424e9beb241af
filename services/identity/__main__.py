"""``python -m services.identity [serve|migrate]``."""

from runtime.cli import run_service
from services.identity.app import build_app
from services.identity.settings import IdentitySettings

if __name__ == "__main__":
    run_service(name="identity", settings_cls=IdentitySettings, build_app=build_app)
