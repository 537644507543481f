"""grpc_health.v1.health_pb2_grpc's stub and servicer, from the generated health_mrpc
(see health_pb2 for why these are separate names for one module)."""
from .health_mrpc import HealthAsyncStub as HealthAsyncStub
from .health_mrpc import HealthServicer as HealthServicer
from .health_mrpc import HealthStub as HealthStub
from .health_mrpc import add_HealthServicer_to_server as add_HealthServicer_to_server

__all__ = ["HealthStub", "HealthAsyncStub", "HealthServicer", "add_HealthServicer_to_server"]
