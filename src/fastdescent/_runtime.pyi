"""Stub of the compiled run-time support module (src/kernels/_runtime.pyx)."""

from collections.abc import Callable, Sequence
from typing import Any, final

from typing_extensions import disjoint_base

from ._typing import FloatArray

__test__: dict[str, str]  # Cython's doctest table

def openmp_enabled() -> bool: ...
def omp_max_threads() -> int: ...
def omp_num_procs() -> int: ...
def thread_limit() -> int: ...
def cpu_supports(variant: str) -> bool: ...
def check_buffers(
    names: tuple[str, ...],
    arrays: tuple[Sequence[FloatArray] | None, ...],
    writable: tuple[bool, ...],
    indexed: bool = True,
) -> int: ...
def check_distinct(name: str, arrays: list[FloatArray]) -> None: ...
def checked_lists(
    names: tuple[str, ...],
    arrays: tuple[FloatArray | Sequence[FloatArray] | None, ...],
    writable: tuple[bool, ...],
) -> tuple[list[FloatArray] | None, ...]: ...

MAX_STEP: int

@disjoint_base
class WrittenBuffers:
    def __init__(self, arrays: list[FloatArray], labels: list[str], groups: list[int]) -> None: ...
    def verify(self) -> None: ...
    def check_grads(
        self,
        params: list[FloatArray],
        grads: list[FloatArray],
        positions: list[int],
        grad_offset: int,
        param_offset: int,
        group: int = -1,
    ) -> None: ...
    def check_stored_grads(
        self, params: list[Any], grads: Sequence[Any], positions: list[int], offset: int, group: int, where: str,
    ) -> list[Any]: ...

def immutable(value: object) -> bool: ...

@disjoint_base
class ExactCache:
    def __init__(self, limit: int = 256) -> None: ...
    def get(self, key: tuple[object, ...]) -> Any: ...
    def put(self, key: tuple[object, ...], value: object) -> None: ...
    def clear(self) -> None: ...
    def __len__(self) -> int: ...

def same_values(mapping: object, names: tuple[str, ...], values: tuple[object, ...] | None) -> bool: ...
def update_each(mappings: list[dict[str, object]], update: dict[str, object]) -> None: ...

@disjoint_base
class KernelCall:
    kernel: str
    def __init__(
        self, kernel: str, buffer_names: tuple[str, ...], constant_names: tuple[str, ...],
        varying_names: tuple[str, ...],
    ) -> None: ...
    def __call__(
        self, backend: object, params: list[FloatArray], grads: list[FloatArray],
        buffers: tuple[list[FloatArray] | None, ...], constants: tuple[object, ...], varying: tuple[object, ...],
        n_threads: int,
    ) -> None: ...
    def has_direct(self, backend: object) -> bool: ...
    def call_direct(
        self, backend: Any, params: Any, grads: Any, buffers: tuple[Any, ...], constants: tuple[Any, ...],
        varying: tuple[Any, ...], n_threads: int,
    ) -> bool: ...

@disjoint_base
class BiasCorrections:
    def __init__(self, python: Callable[[dict[str, Any], int], tuple[float, float]]) -> None: ...
    def __call__(self, h: dict[str, Any], step: int) -> tuple[float, float]: ...

@disjoint_base
class KernelArguments:
    def __init__(self, spec: Any, hyper: dict[str, Any]) -> None: ...
    def get(self, step: int | None, grad_scale: float, fresh: frozenset[str]) -> tuple[Any, ...]: ...
    def constant(self, step: int | None, grad_scale: float, fresh: frozenset[str]) -> tuple[Any, ...]: ...
    def varying(self, step: int | None) -> tuple[Any, ...]: ...

@disjoint_base
class CallDefaults:
    block: Any
    modules: dict[str, Any]
    env_backend: str
    default_threads: int | None
    default_backend: str | None
    def __init__(self, block: Any, modules: dict[str, Any], env_backend: str, check: Callable[[object], object],
                 load: Callable[[object], Any]) -> None: ...
    def threads(self, n_threads: object = None) -> int: ...
    def backend(self, backend: object = None) -> Any: ...

@disjoint_base
class StoredCall:
    @property
    def params(self) -> list[Any]: ...
    @property
    def grads(self) -> list[Any] | None: ...
    @property
    def buffers(self) -> tuple[list[Any] | None, ...]: ...
    @property
    def ids(self) -> Any: ...
    @property
    def where(self) -> str: ...
    def __init__(
        self, params: list[Any], buffers: tuple[list[Any] | None, ...], roles: list[tuple[Any, ...]], ids: Any,
        grad_kind: int, storage: Any, formats: Callable[..., Any], where: str, grads: list[Any] | None = None,
    ) -> None: ...
    def formats_at(self, step: object) -> list[tuple[Any, ...]]: ...
    def call(
        self, kernels: Any, invoke: KernelCall, grads: list[Any] | None, constants: tuple[object, ...],
        varying: tuple[object, ...], n_threads: int, step: object,
    ) -> None: ...

@disjoint_base
class BucketPlan:
    params: list[FloatArray]
    positions: list[int]
    grads: list[FloatArray] | None
    buffers: tuple[list[FloatArray] | None, ...]
    span: slice | None
    stored: StoredCall | None
    def __init__(
        self, params: list[FloatArray], buffers: tuple[list[FloatArray] | None, ...], positions: list[int],
        span: slice | None, grads: list[FloatArray] | None = None, stored: StoredCall | None = None,
    ) -> None: ...

@disjoint_base
class GroupPlan:
    group: Any
    param_list: Any
    names: tuple[str, ...]
    values: tuple[object, ...]
    present: tuple[bool, ...]
    states: list[dict[str, Any]]
    buckets: list[BucketPlan]
    arguments: KernelArguments
    first: int
    size: int
    counts_steps: bool
    def __init__(
        self, group: Any, names: tuple[str, ...], values: tuple[object, ...], param_list: Any,
        states: list[dict[str, Any]], buckets: list[BucketPlan], arguments: KernelArguments, first: int,
        size: int, counts_steps: bool, present: tuple[bool, ...],
    ) -> None: ...

@disjoint_base
class StepPlan:
    def __init__(
        self, param_groups: list[dict[str, Any]], groups: list[GroupPlan], written: WrittenBuffers, flat: bool,
        fresh: frozenset[str], defaults: CallDefaults,
    ) -> None: ...
    def run(
        self, param_groups: object, grads: object, grad_scale: object, backend: object, n_threads: object,
        optimizer: Any,
    ) -> bool: ...

@final
class Face:
    __name__: str
    __qualname__: str
    __signature__: Any
    def __init__(
        self, name: str, names: tuple[str, ...], n_positional: int, defaults: tuple[object, ...], required: object,
        slots: tuple[Any, ...], configs: ExactCache, roles: tuple[str, ...], writable: tuple[bool, ...],
        uses_step: bool, simple: bool, general: Callable[..., Any], call_defaults: CallDefaults,
        nothing_fresh: frozenset[str],
    ) -> None: ...
    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...
    def __get__(self, instance: object, owner: type | None = None) -> Face: ...
    def __reduce__(self) -> str: ...
