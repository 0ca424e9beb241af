"""The gateway: onecard's only HTTP face.

It authenticates partners (OAuth2 client credentials, signed bearer tokens), scopes every call to
the token's tenant, limits request rates, and translates HTTP to the services' gRPC and back,
answering errors as problem+json. Domain rules live in the services, never here.
"""
