"""The operations console: server-rendered pages for a tenant's operators under ``/console``.

An operator signs in with an API client of the tenant (its id and secret); the console trades them
for an access token at the gateway's own ``POST /v1/oauth/token`` and keeps it in an encrypted,
HttpOnly, SameSite=Strict session cookie (gateway.console.session). Every page then calls the
gateway's public REST routes with that token, in-process over httpx's ASGI transport
(gateway.console.api): the same authentication, tenant scoping, scopes, rate limits and problem
answers as every other caller. There is no second path to the data: the console imports no gRPC
stub and no service code.
"""
