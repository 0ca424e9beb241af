"""``python -m services.devicehub [serve|migrate]``."""

from runtime.cli import run_service
from services.devicehub.app import build_app
from services.devicehub.settings import DevicehubSettings

if __name__ == "__main__":
    run_service(name="devicehub", settings_cls=DevicehubSettings, build_app=build_app)
