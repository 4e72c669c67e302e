"""The application core shared by the REST gateway and the gRPC door: validate, enqueue, view, cancel, follow."""

from services.core.core import Core

__all__ = ["Core"]
