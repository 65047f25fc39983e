from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MemorySource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MEMORY_SOURCE_UNSPECIFIED: _ClassVar[MemorySource]
    MEMORY_SOURCE_GPU_METRICS: _ClassVar[MemorySource]
    MEMORY_SOURCE_DECLARED: _ClassVar[MemorySource]

class ModelState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_STATE_UNSPECIFIED: _ClassVar[ModelState]
    MODEL_STATE_READY: _ClassVar[ModelState]
    MODEL_STATE_LOADING: _ClassVar[ModelState]
    MODEL_STATE_UNLOADING: _ClassVar[ModelState]
    MODEL_STATE_UNAVAILABLE: _ClassVar[ModelState]
MEMORY_SOURCE_UNSPECIFIED: MemorySource
MEMORY_SOURCE_GPU_METRICS: MemorySource
MEMORY_SOURCE_DECLARED: MemorySource
MODEL_STATE_UNSPECIFIED: ModelState
MODEL_STATE_READY: ModelState
MODEL_STATE_LOADING: ModelState
MODEL_STATE_UNLOADING: ModelState
MODEL_STATE_UNAVAILABLE: ModelState

class PickTargetRequest(_message.Message):
    __slots__ = ("model_name", "model_version", "headers", "wait_for_load_ms")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    WAIT_FOR_LOAD_MS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    headers: _containers.ScalarMap[str, str]
    wait_for_load_ms: int
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., headers: _Optional[_Mapping[str, str]] = ..., wait_for_load_ms: _Optional[int] = ...) -> None: ...

class PickTargetResponse(_message.Message):
    __slots__ = ("target", "fallbacks", "generation", "model_version")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    FALLBACKS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    target: Target
    fallbacks: _containers.RepeatedCompositeFieldContainer[Target]
    generation: int
    model_version: str
    def __init__(self, target: _Optional[_Union[Target, _Mapping]] = ..., fallbacks: _Optional[_Iterable[_Union[Target, _Mapping]]] = ..., generation: _Optional[int] = ..., model_version: _Optional[str] = ...) -> None: ...

class Target(_message.Message):
    __slots__ = ("instance_id", "grpc_address", "ready_versions")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    GRPC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    READY_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    grpc_address: str
    ready_versions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, instance_id: _Optional[str] = ..., grpc_address: _Optional[str] = ..., ready_versions: _Optional[_Iterable[str]] = ...) -> None: ...

class WatchRoutesRequest(_message.Message):
    __slots__ = ("client_id", "model_names")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAMES_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    model_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, client_id: _Optional[str] = ..., model_names: _Optional[_Iterable[str]] = ...) -> None: ...

class WatchRoutesResponse(_message.Message):
    __slots__ = ("full_snapshot", "tables", "removed_models", "generation", "router_id", "priority_policy", "session_policy")
    FULL_SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    REMOVED_MODELS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    ROUTER_ID_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_POLICY_FIELD_NUMBER: _ClassVar[int]
    SESSION_POLICY_FIELD_NUMBER: _ClassVar[int]
    full_snapshot: bool
    tables: _containers.RepeatedCompositeFieldContainer[RouteTable]
    removed_models: _containers.RepeatedScalarFieldContainer[str]
    generation: int
    router_id: str
    priority_policy: PriorityPolicy
    session_policy: SessionPolicy
    def __init__(self, full_snapshot: _Optional[bool] = ..., tables: _Optional[_Iterable[_Union[RouteTable, _Mapping]]] = ..., removed_models: _Optional[_Iterable[str]] = ..., generation: _Optional[int] = ..., router_id: _Optional[str] = ..., priority_policy: _Optional[_Union[PriorityPolicy, _Mapping]] = ..., session_policy: _Optional[_Union[SessionPolicy, _Mapping]] = ...) -> None: ...

class SessionPolicy(_message.Message):
    __slots__ = ("header", "max_in_flight", "move_ttl_s")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    MAX_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    MOVE_TTL_S_FIELD_NUMBER: _ClassVar[int]
    header: str
    max_in_flight: int
    move_ttl_s: float
    def __init__(self, header: _Optional[str] = ..., max_in_flight: _Optional[int] = ..., move_ttl_s: _Optional[float] = ...) -> None: ...

class PriorityPolicy(_message.Message):
    __slots__ = ("classes", "default_class")
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_CLASS_FIELD_NUMBER: _ClassVar[int]
    classes: _containers.RepeatedCompositeFieldContainer[PriorityClass]
    default_class: str
    def __init__(self, classes: _Optional[_Iterable[_Union[PriorityClass, _Mapping]]] = ..., default_class: _Optional[str] = ...) -> None: ...

class PriorityClass(_message.Message):
    __slots__ = ("name", "triton_priority", "sheddable")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TRITON_PRIORITY_FIELD_NUMBER: _ClassVar[int]
    SHEDDABLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    triton_priority: int
    sheddable: bool
    def __init__(self, name: _Optional[str] = ..., triton_priority: _Optional[int] = ..., sheddable: _Optional[bool] = ...) -> None: ...

class RouteTable(_message.Message):
    __slots__ = ("model_name", "candidates", "ttl_ms", "generation", "default_version", "version_policy")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSION_POLICY_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    candidates: _containers.RepeatedCompositeFieldContainer[RouteCandidate]
    ttl_ms: int
    generation: int
    default_version: str
    version_policy: VersionPolicy
    def __init__(self, model_name: _Optional[str] = ..., candidates: _Optional[_Iterable[_Union[RouteCandidate, _Mapping]]] = ..., ttl_ms: _Optional[int] = ..., generation: _Optional[int] = ..., default_version: _Optional[str] = ..., version_policy: _Optional[_Union[VersionPolicy, _Mapping]] = ...) -> None: ...

class VersionPolicy(_message.Message):
    __slots__ = ("splits", "sticky_header", "header_rules")
    SPLITS_FIELD_NUMBER: _ClassVar[int]
    STICKY_HEADER_FIELD_NUMBER: _ClassVar[int]
    HEADER_RULES_FIELD_NUMBER: _ClassVar[int]
    splits: _containers.RepeatedCompositeFieldContainer[VersionWeight]
    sticky_header: str
    header_rules: _containers.RepeatedCompositeFieldContainer[HeaderRule]
    def __init__(self, splits: _Optional[_Iterable[_Union[VersionWeight, _Mapping]]] = ..., sticky_header: _Optional[str] = ..., header_rules: _Optional[_Iterable[_Union[HeaderRule, _Mapping]]] = ...) -> None: ...

class VersionWeight(_message.Message):
    __slots__ = ("version", "weight")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    version: str
    weight: float
    def __init__(self, version: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class HeaderRule(_message.Message):
    __slots__ = ("header", "value", "version")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    header: str
    value: str
    version: str
    def __init__(self, header: _Optional[str] = ..., value: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class RouteCandidate(_message.Message):
    __slots__ = ("target", "weight")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    target: Target
    weight: float
    def __init__(self, target: _Optional[_Union[Target, _Mapping]] = ..., weight: _Optional[float] = ...) -> None: ...

class ListInstancesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListInstancesResponse(_message.Message):
    __slots__ = ("instances",)
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedCompositeFieldContainer[Instance]
    def __init__(self, instances: _Optional[_Iterable[_Union[Instance, _Mapping]]] = ...) -> None: ...

class Instance(_message.Message):
    __slots__ = ("instance_id", "grpc_address", "metrics_url", "healthy", "data_age_ms", "models", "memory_used_bytes", "memory_budget_bytes", "pending_requests", "inferences_per_second", "memory_source", "last_error")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    GRPC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    METRICS_URL_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    DATA_AGE_MS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    PENDING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    INFERENCES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    MEMORY_SOURCE_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    grpc_address: str
    metrics_url: str
    healthy: bool
    data_age_ms: int
    models: _containers.RepeatedCompositeFieldContainer[LoadedModel]
    memory_used_bytes: int
    memory_budget_bytes: int
    pending_requests: int
    inferences_per_second: float
    memory_source: MemorySource
    last_error: str
    def __init__(self, instance_id: _Optional[str] = ..., grpc_address: _Optional[str] = ..., metrics_url: _Optional[str] = ..., healthy: _Optional[bool] = ..., data_age_ms: _Optional[int] = ..., models: _Optional[_Iterable[_Union[LoadedModel, _Mapping]]] = ..., memory_used_bytes: _Optional[int] = ..., memory_budget_bytes: _Optional[int] = ..., pending_requests: _Optional[int] = ..., inferences_per_second: _Optional[float] = ..., memory_source: _Optional[_Union[MemorySource, str]] = ..., last_error: _Optional[str] = ...) -> None: ...

class LoadedModel(_message.Message):
    __slots__ = ("model_name", "model_version", "state", "pending_requests", "declared_memory_bytes")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PENDING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    DECLARED_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    state: ModelState
    pending_requests: int
    declared_memory_bytes: int
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., state: _Optional[_Union[ModelState, str]] = ..., pending_requests: _Optional[int] = ..., declared_memory_bytes: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelSummary]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelSummary, _Mapping]]] = ...) -> None: ...

class ModelSummary(_message.Message):
    __slots__ = ("model_name", "ready_instances", "loading_instances", "ready_versions", "route_table", "copies", "target_copies", "demand_rps", "forecast_rps", "last_decision")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    READY_INSTANCES_FIELD_NUMBER: _ClassVar[int]
    LOADING_INSTANCES_FIELD_NUMBER: _ClassVar[int]
    READY_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    ROUTE_TABLE_FIELD_NUMBER: _ClassVar[int]
    COPIES_FIELD_NUMBER: _ClassVar[int]
    TARGET_COPIES_FIELD_NUMBER: _ClassVar[int]
    DEMAND_RPS_FIELD_NUMBER: _ClassVar[int]
    FORECAST_RPS_FIELD_NUMBER: _ClassVar[int]
    LAST_DECISION_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    ready_instances: _containers.RepeatedScalarFieldContainer[str]
    loading_instances: _containers.RepeatedScalarFieldContainer[str]
    ready_versions: _containers.RepeatedScalarFieldContainer[str]
    route_table: RouteTable
    copies: int
    target_copies: int
    demand_rps: float
    forecast_rps: float
    last_decision: PlacementDecision
    def __init__(self, model_name: _Optional[str] = ..., ready_instances: _Optional[_Iterable[str]] = ..., loading_instances: _Optional[_Iterable[str]] = ..., ready_versions: _Optional[_Iterable[str]] = ..., route_table: _Optional[_Union[RouteTable, _Mapping]] = ..., copies: _Optional[int] = ..., target_copies: _Optional[int] = ..., demand_rps: _Optional[float] = ..., forecast_rps: _Optional[float] = ..., last_decision: _Optional[_Union[PlacementDecision, _Mapping]] = ...) -> None: ...

class PlacementDecision(_message.Message):
    __slots__ = ("action", "instance_id", "reason", "decided_unix_ms")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DECIDED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    action: str
    instance_id: str
    reason: str
    decided_unix_ms: int
    def __init__(self, action: _Optional[str] = ..., instance_id: _Optional[str] = ..., reason: _Optional[str] = ..., decided_unix_ms: _Optional[int] = ...) -> None: ...

class GetPolicyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetPolicyResponse(_message.Message):
    __slots__ = ("policy_version", "source", "policy_yaml", "loaded_unix_ms")
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    POLICY_YAML_FIELD_NUMBER: _ClassVar[int]
    LOADED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    policy_version: str
    source: str
    policy_yaml: str
    loaded_unix_ms: int
    def __init__(self, policy_version: _Optional[str] = ..., source: _Optional[str] = ..., policy_yaml: _Optional[str] = ..., loaded_unix_ms: _Optional[int] = ...) -> None: ...

class ReloadPolicyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadPolicyResponse(_message.Message):
    __slots__ = ("policy_version", "changed")
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    policy_version: str
    changed: bool
    def __init__(self, policy_version: _Optional[str] = ..., changed: _Optional[bool] = ...) -> None: ...
