from tests.grpc.conftest import channel, gateway, grpc_target  # noqa: F401 - shared fixtures
