"""grpc.health.v1, as grpcio-health-checking's `grpc_health.v1`.

* `health`: `HealthServicer` (sync; also serves mrpcd.aio), `health.aio.HealthServicer`
  (asyncio), `SERVICE_NAME`, `OVERALL_HEALTH`;
* `health_pb2`: the messages (`HealthCheckRequest`, `HealthCheckResponse` with the
  `ServingStatus` values as class constants, `HealthListRequest`, `HealthListResponse`);
* `health_pb2_grpc`: `HealthStub`, the `HealthServicer` base, `add_HealthServicer_to_server`.

Both pb2 modules are names for `health_mrpc`, what mrpcd-stubgen generates from the vendored
health.proto (one module, as for every .proto; tests/test_health.py checks that it is what
the generator makes of the .proto today, so the two cannot drift apart).
"""
