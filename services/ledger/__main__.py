"""``python -m services.ledger [serve|migrate]``."""

from runtime.cli import run_service
from services.ledger.app import build_app
from services.ledger.settings import LedgerSettings

if __name__ == "__main__":
    run_service(name="ledger", settings_cls=LedgerSettings, build_app=build_app)
