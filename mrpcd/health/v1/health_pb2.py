"""grpc_health.v1.health_pb2's messages, from the generated health_mrpc.

Why a module of its own: ported code imports `health_pb2` and `health_pb2_grpc` as
grpcio-tools lays them out; mrpcd-stubgen makes one module per .proto, so these are names
for it. There is no `DESCRIPTOR` (mrpcd messages have no protobuf descriptors; `SCHEMA` is
the schema)."""
from .health_mrpc import SCHEMA as SCHEMA
from .health_mrpc import HealthCheckRequest as HealthCheckRequest
from .health_mrpc import HealthCheckResponse as HealthCheckResponse
from .health_mrpc import HealthListRequest as HealthListRequest
from .health_mrpc import HealthListResponse as HealthListResponse

__all__ = ["SCHEMA", "HealthCheckRequest", "HealthCheckResponse", "HealthListRequest", "HealthListResponse"]
