"""A grpcurl-style caller that knows nothing but server reflection (no generated code):

    python -m client.latentd_client.reflect 127.0.0.1:50051 list
    python -m client.latentd_client.reflect 127.0.0.1:50051 describe latentd.v1.LatentdService
    python -m client.latentd_client.reflect -H "authorization: Bearer KEY" -d '{"params": {...}}' \\
        127.0.0.1:50051 latentd.v1.LatentdService/SubmitGeneration
Requests and responses are JSON (proto3 JSON mapping); server streams print one JSON per message.
"""

from __future__ import annotations

import argparse
import json
import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="latentd-reflect", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-H", "--header", action="append", default=[], help='"name: value" metadata')
    parser.add_argument("-d", "--data", default="{}", help="request as JSON")
    parser.add_argument("target", help="host:port")
    parser.add_argument("what", help="list | describe SYMBOL | package.Service/Method")
    parser.add_argument("symbol", nargs="?")
    args = parser.parse_args(argv)
    with grpc.insecure_channel(args.target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        pool = descriptor_pool.DescriptorPool(database)
        if args.what == "list":
            print("\n".join(database.get_services()))
            return 0
        if args.what == "describe":
            service = pool.FindServiceByName(args.symbol)
            for method in service.methods:
                stream = "stream " if method.server_streaming else ""
                print(
                    f"rpc {method.name}({method.input_type.full_name}) returns ({stream}{method.output_type.full_name})"
                )
            return 0
        service_name, _, method_name = args.what.rpartition("/")
        method = pool.FindServiceByName(service_name).FindMethodByName(method_name)
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        request = json_format.Parse(args.data, request_cls())
        metadata = [tuple(part.strip() for part in h.split(":", 1)) for h in args.header]
        path = f"/{service_name}/{method_name}"
        kind = channel.unary_stream if method.server_streaming else channel.unary_unary
        call = kind(
            path, request_serializer=lambda m: m.SerializeToString(), response_deserializer=response_cls.FromString
        )
        try:
            replies = call(request, metadata=metadata)
            for reply in replies if method.server_streaming else [replies]:
                print(json.dumps(json_format.MessageToDict(reply), indent=None if method.server_streaming else 2))
        except grpc.RpcError as exc:
            print(f"ERROR:\n  Code: {exc.code().name}\n  Message: {exc.details()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
