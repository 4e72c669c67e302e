"""Clients of latentd: Python (sync and asyncio, REST and gRPC) and the `latentd` command line."""
