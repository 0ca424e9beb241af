"""docs/security.md shows the allow-list and the NATS accounts as the code has them."""
from devstack.security_doc import DOC, onecard_services, render


def test_the_security_doc_shows_the_allow_list_and_accounts_the_code_enforces() -> None:
    text = DOC.read_text()
    assert render(text) == text, "docs/security.md is out of date: run .venv/bin/python -m devstack.security_doc"
    for service in onecard_services():
        for method in service.methods:
            assert f"`{method.full_name}`" in text, method.full_name
