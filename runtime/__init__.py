"""The shared runtime every onecard service stands on.

Settings, logging, the database pool and migrations, NATS outbox and consumers, the gRPC server
bootstrap with its error mapping. Nothing here knows about any one service.
"""

# The onecard release every process reports (OpsService.GetServiceInfo); pyproject.toml carries the
# same (tests/admin checks the two agree).
VERSION = "0.1.0"
