"""``python -m services.codegen [serve|migrate]``."""

from runtime.cli import run_service
from services.codegen.app import build_app
from services.codegen.settings import CodegenSettings

if __name__ == "__main__":
    run_service(name="codegen", settings_cls=CodegenSettings, build_app=build_app)
