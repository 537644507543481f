"""grpc's standard services, built in: `mrpcd.health.v1` is grpc.health.v1.Health.

Laid out as grpcio-health-checking's `grpc_health.v1` (health, health_pb2, health_pb2_grpc),
so porting is an import change.
"""
