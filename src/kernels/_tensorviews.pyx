# The per-step reads of fastdescent.torch in one C loop: the gradients of a bucket of
# parameters as NumPy views, and the checks that the cached views of the parameters
# and their state still show the tensors' memory; and, while nothing but the
# gradients changes, the whole step (``StepPlan``).
#
# fastdescent.torch steps tensors with the NumPy-facing kernels. Viewing a gradient
# with ``Tensor.numpy()`` costs about 0.8 us, and a step on a small model has a
# hundred of them. Here each gradient has one flat ndarray that owns no memory and
# is pointed at the gradient's data before each step. A tensor's data pointer,
# shape, strides, dtype and device are read in one C call, through DLPack's C
# exchange API (``torch.Tensor.__dlpack_c_exchange_api__``: a table of C functions
# that DLPack 1.x standardises, and torch fills): no Python call, no object made.
# So every gradient's layout is checked at every step; a gradient object not
# accepted at the previous step also has its negative and conjugate bits read
# (which DLPack does not show), through torch's methods.
#
# The module never imports torch: the caller passes the tensor methods it uses. The
# views are private to fastdescent.torch and are read only while the caller holds
# the gradient tensors they point into (``grads``, until ``release``).

cimport numpy as cnp
import numpy
from cpython.dict cimport PyDict_GetItem, PyDict_GetItemWithError
from cpython.exc cimport PyErr_Clear
from cpython.object cimport PyObject, PyTypeObject
from cpython.pycapsule cimport PyCapsule_GetPointer, PyCapsule_IsValid
from cpython.ref cimport Py_INCREF
from cpython.weakref cimport PyWeakref_GetObject, PyWeakref_NewRef
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc

cnp.import_array()

cdef extern from "numpy/arrayobject.h":
    # The one field of an ndarray written here: where its elements are.
    ctypedef struct PyArrayObject_fields:
        char* data
    object PyArray_NewFromDescr(PyTypeObject* subtype, cnp.dtype descr, int nd, cnp.npy_intp* dims,
                                cnp.npy_intp* strides, void* data, int flags, object parent)

cdef extern from "Python.h":
    object PyObject_Vectorcall(object callable, PyObject** args, size_t nargsf, PyObject* kwnames)
    PyTypeObject* Py_TYPE(object o)

cdef double _unused[1]   # where a view points before its first gradient (aligned)
cdef object _FLOAT64 = numpy.float64

include "_direct_abi.pxi"

#: ``collect`` results.
STALE = -1      # a parameter's storage moved or a state tensor was replaced: rebuild
PARTIAL = 0     # see ``missing`` and ``odd``
COMPLETE = 1    # every gradient present and viewed


# ------------------------------------------------------------------ DLPack 1.x
# The structs of DLPack's dlpack.h (major version 1) that are read here.
cdef struct DLDevice:
    int32_t device_type        # an enum in dlpack.h; kDLCPU is 1
    int32_t device_id

cdef struct DLDataType:
    uint8_t code
    uint8_t bits
    uint16_t lanes

cdef struct DLTensor:
    void* data
    DLDevice device
    int32_t ndim
    DLDataType dtype
    int64_t* shape             # ndim sizes, in the producer's memory
    int64_t* strides           # ndim strides in elements (never NULL from DLPack 1.2 on)
    uint64_t byte_offset

cdef struct DLPackVersion:
    uint32_t major
    uint32_t minor

cdef struct DLPackExchangeAPIHeader:
    DLPackVersion version
    DLPackExchangeAPIHeader* prev_api    # an older version's table, or NULL

# Fills ``out`` (no allocation, nothing owned) from a tensor of the producer; 0, or
# -1 with a Python exception set (not a strided tensor, no storage...).
ctypedef int (*DLTensorFromPyObject)(void* py_object, DLTensor* out) noexcept

cdef struct DLPackExchangeAPI:
    DLPackExchangeAPIHeader header
    void* managed_tensor_allocator
    void* managed_tensor_from_py_object_no_sync
    void* managed_tensor_to_py_object_no_sync
    DLTensorFromPyObject dltensor_from_py_object_no_sync   # may be NULL
    void* current_work_stream

cdef enum:
    DL_CPU = 1


cdef DLTensorFromPyObject _dltensor_reader(object capsule):
    """The exchange table's ``dltensor_from_py_object_no_sync`` of major version 1
    (walking ``prev_api`` from a newer one), or NULL if ``capsule`` has none."""
    cdef DLPackExchangeAPIHeader* header
    if capsule is None or not PyCapsule_IsValid(capsule, "dlpack_exchange_api"):
        return NULL
    header = <DLPackExchangeAPIHeader*>PyCapsule_GetPointer(capsule, "dlpack_exchange_api")
    while header != NULL and header.version.major != 1:
        header = header.prev_api
    if header == NULL:
        return NULL
    return (<DLPackExchangeAPI*>header).dltensor_from_py_object_no_sync


cdef inline object _call(object method, object tensor):
    cdef PyObject* arg = <PyObject*>tensor
    return PyObject_Vectorcall(method, &arg, 1, NULL)


cdef extern from *:
    """
    /* A C type's method without arguments and a C type's attribute, called as
       CPython calls them once the attribute lookup has found them (a third of the
       cost of reaching a tensor is that lookup and the call's dispatch). */
    static int fd_is_noargs_method(PyObject* descr) {
        return Py_IS_TYPE(descr, &PyMethodDescr_Type)
            && ((PyMethodDescrObject*)descr)->d_method->ml_flags == METH_NOARGS;
    }
    static int fd_is_getter(PyObject* descr) {
        return Py_IS_TYPE(descr, &PyGetSetDescr_Type) && ((PyGetSetDescrObject*)descr)->d_getset->get != NULL;
    }
    static PyObject* fd_call_noargs(PyObject* descr, PyObject* self) {
        return ((PyMethodDescrObject*)descr)->d_method->ml_meth(self, NULL);
    }
    static PyObject* fd_get(PyObject* descr, PyObject* self) {
        PyGetSetDef* def = ((PyGetSetDescrObject*)descr)->d_getset;
        return def->get(self, def->closure);
    }
    """
    bint fd_is_noargs_method(object descr)
    bint fd_is_getter(object descr)
    object fd_call_noargs(object descr, object self)
    object fd_get(object descr, object self)


cdef class WrittenSpans:
    """The bytes a step writes (every parameter and state buffer of every group,
    step counts, scratch blocks), as sorted, disjoint spans: the given ``[lo, hi)``
    address pairs merged where they overlap or touch, which changes no answer.
    Built when the optimizer's plans change; a step asks :meth:`hits` of each
    gradient: a binary search, O(log n), no Python work.

    A span may hold bytes nobody writes (a gapped parameter counts by its whole
    extent, gaps included): a hit is a reason to look closer, on the general way,
    not yet an error. No hit means no shared byte."""

    cdef Py_ssize_t n
    cdef size_t* lo
    cdef size_t* hi

    def __cinit__(self):
        self.lo = self.hi = NULL

    def __dealloc__(self):
        free(self.lo)
        free(self.hi)

    def __init__(self, spans):
        cdef list merged = [], last = None
        cdef Py_ssize_t k
        if self.lo != NULL:
            raise RuntimeError("a WrittenSpans table is built once")
        for lo, hi in sorted([(int(lo), int(hi)) for lo, hi in spans if hi > lo]):
            if last is not None and lo <= last[1]:
                last[1] = max(last[1], hi)
            else:
                last = [lo, hi]
                merged.append(last)
        self.n = len(merged)
        self.lo = <size_t*>malloc(max(1, self.n) * sizeof(size_t))
        self.hi = <size_t*>malloc(max(1, self.n) * sizeof(size_t))
        if self.lo == NULL or self.hi == NULL:
            raise MemoryError()
        for k in range(self.n):
            self.lo[k], self.hi[k] = merged[k][0], merged[k][1]

    def hits(self, size_t lo, size_t hi):
        """True if ``[lo, hi)`` shares a byte with a span."""
        return self._hits(lo, hi)

    cdef bint _hits(self, size_t lo, size_t hi) noexcept:
        cdef Py_ssize_t first = 0, last = self.n, mid
        if hi <= lo:
            return False
        while first < last:  # the first span that ends after lo (ends are sorted too)
            mid = (first + last) // 2
            if self.hi[mid] <= lo:
                first = mid + 1
            else:
                last = mid
        return first < self.n and self.lo[first] < hi


cdef class BucketViews:
    """The gradients of ``params`` as flat NumPy views, refreshed by :meth:`collect`.

    ``views[i]`` is a 1-D ndarray of ``numels[i]`` elements of ``dtype`` that
    shows the gradient of ``params[i]`` after a ``collect`` that accepted it
    (``complex_``: the parameters are complex, seen as real pairs). A gradient is
    accepted if it is a strided CPU tensor of the parameters' dtype (all of
    ``params`` have one) and of ``numels[i]`` such elements, aligned, laid out
    C-contiguously if ``strides[i]`` is None, else with exactly the strides
    ``strides[i]`` (its parameter's, for a channels_last or permuted one), not a
    negative or conjugate view, and sharing no memory with ``buffers[i]``, the
    arrays the kernel writes for parameter ``i``, nor with any span of the
    :class:`WrittenSpans` given to ``collect`` (what the step writes for every
    parameter). ``collect`` also checks that
    ``params[i]`` still has its data at ``param_ptrs[i]`` and that
    ``states[i][keys[k]] is tensors[i][k]``: the cached views are still valid.

    ``methods`` are torch's ``(Tensor.data_ptr, Tensor.is_contiguous,
    Tensor.stride, Tensor.is_neg, Tensor.is_conj)``, its ``grad`` attribute (the
    descriptor), ``Tensor.__dlpack_c_exchange_api__`` (or None) and ``plain``,
    the types that inherit them all unchanged (``torch.Tensor``,
    ``torch.nn.Parameter``). The layout of objects of those types is read through
    the exchange table, and ``grad``, ``is_neg`` and ``is_conj`` are called
    directly (CPython's descriptor types only); any other object, or a torch
    without the table, is asked through its Python methods.
    """

    cdef readonly tuple params
    cdef readonly list views, grads, missing, odd
    cdef list refs
    cdef tuple states, tensors, keys, owned_views, plain, buffers
    # Borrowed from the tuples above (which nothing else can change): the loop's
    # reads without Python indexing.
    cdef PyObject** param_refs
    cdef PyObject** state_refs
    cdef PyObject** tensor_refs     # n * len(keys): the state tensors of parameter i at [i * len(keys), ...)
    cdef PyObject** view_refs
    cdef PyTypeObject** plain_types
    cdef Py_ssize_t n_keys, n_plain
    cdef Py_ssize_t* param_ptrs
    cdef Py_ssize_t* nbytes
    cdef int64_t* want_strides      # the strides wanted of gradient i at [stride_at[i], stride_at[i + 1])
    cdef Py_ssize_t* stride_at      # (an empty range: C-contiguous)
    cdef char** ranges              # [lo, hi) of each buffer of parameter i at [range_at[i], range_at[i + 1])
    cdef Py_ssize_t* range_at
    cdef Py_ssize_t n, itemsize
    cdef bint complex_, direct_methods
    cdef DLTensorFromPyObject read_layout
    cdef DLDataType dl_dtype        # the parameters' dtype, as DLPack names it
    cdef object data_ptr, is_contiguous, stride_of, is_neg, is_conj, grad_attribute, torch_dtype
    cdef tuple strides

    def __cinit__(self):
        self.param_ptrs = self.nbytes = self.stride_at = self.range_at = NULL
        self.want_strides = NULL
        self.ranges = NULL
        self.param_refs = self.state_refs = self.tensor_refs = self.view_refs = NULL
        self.plain_types = NULL

    def __init__(self, list params, list param_ptrs, list states, tuple keys, list tensors,
                 list numels, dtype, bint complex_, list strides, list buffers, tuple methods):
        cdef Py_ssize_t i, k, n_strides = 0, n_ranges = 0
        cdef cnp.npy_intp dim
        cdef cnp.dtype descr = cnp.dtype(dtype)
        cdef cnp.ndarray buffer
        cdef object exchange
        self.params = tuple(params)
        self.n = len(self.params)
        if not (len(param_ptrs) == len(states) == len(tensors) == len(numels) == len(strides) == len(buffers)
                == self.n):
            raise ValueError("one pointer, state, tensor tuple, size, stride and buffer list per parameter")
        self.keys = keys
        self.n_keys = len(keys)
        self.states = tuple(states)
        self.tensors = tuple([tuple(t) for t in tensors])
        for i in range(self.n):
            if type(self.states[i]) is not dict or len(self.tensors[i]) != self.n_keys:
                raise ValueError("a state dict and one tensor per key for each parameter")
        for key in keys:
            if type(key) is not str:
                raise TypeError("state keys are str")
        self.itemsize = descr.itemsize
        self.complex_ = complex_
        (self.data_ptr, self.is_contiguous, self.stride_of, self.is_neg, self.is_conj, self.grad_attribute,
         exchange, plain) = methods
        self.plain = tuple(plain)
        for kind in self.plain:
            if not isinstance(kind, type):
                raise TypeError("plain: types")
        self.direct_methods = (fd_is_getter(self.grad_attribute) and fd_is_noargs_method(self.data_ptr)
                               and fd_is_noargs_method(self.is_neg) and fd_is_noargs_method(self.is_conj))
        self.strides = tuple(strides)
        self.buffers = tuple(buffers)   # (their memory ranges are in ranges)
        self.torch_dtype = self.params[0].dtype if self.n else None
        for i in range(self.n):
            if self.params[i].dtype is not self.torch_dtype:
                raise ValueError("the parameters of a bucket have one dtype")
            n_strides += 0 if strides[i] is None else len(strides[i])
            n_ranges += len(buffers[i])
        self.param_ptrs = <Py_ssize_t*>malloc(max(1, self.n) * sizeof(Py_ssize_t))
        self.nbytes = <Py_ssize_t*>malloc(max(1, self.n) * sizeof(Py_ssize_t))
        self.stride_at = <Py_ssize_t*>malloc((self.n + 1) * sizeof(Py_ssize_t))
        self.want_strides = <int64_t*>malloc(max(1, n_strides) * sizeof(int64_t))
        self.range_at = <Py_ssize_t*>malloc((self.n + 1) * sizeof(Py_ssize_t))
        self.ranges = <char**>malloc(max(1, 2 * n_ranges) * sizeof(char*))
        self.param_refs = <PyObject**>malloc(max(1, self.n) * sizeof(PyObject*))
        self.state_refs = <PyObject**>malloc(max(1, self.n) * sizeof(PyObject*))
        self.tensor_refs = <PyObject**>malloc(max(1, self.n * self.n_keys) * sizeof(PyObject*))
        self.view_refs = <PyObject**>malloc(max(1, self.n) * sizeof(PyObject*))
        self.n_plain = len(self.plain)
        self.plain_types = <PyTypeObject**>malloc(max(1, self.n_plain) * sizeof(PyTypeObject*))
        if (self.param_ptrs == NULL or self.nbytes == NULL or self.stride_at == NULL or self.want_strides == NULL
                or self.range_at == NULL or self.ranges == NULL or self.param_refs == NULL or self.state_refs == NULL
                or self.tensor_refs == NULL or self.view_refs == NULL or self.plain_types == NULL):
            raise MemoryError()
        for k in range(self.n_plain):
            self.plain_types[k] = <PyTypeObject*>self.plain[k]
        for i in range(self.n):
            self.param_refs[i] = <PyObject*>self.params[i]
            self.state_refs[i] = <PyObject*>self.states[i]
            for k in range(self.n_keys):
                self.tensor_refs[i * self.n_keys + k] = <PyObject*>self.tensors[i][k]
        self.stride_at[0] = self.range_at[0] = 0
        for i in range(self.n):
            self.param_ptrs[i] = param_ptrs[i]
            self.nbytes[i] = numels[i] * self.itemsize
            self.stride_at[i + 1] = self.stride_at[i]
            if strides[i] is not None:
                for k in range(len(strides[i])):
                    self.want_strides[self.stride_at[i + 1]] = strides[i][k]
                    self.stride_at[i + 1] += 1
            self.range_at[i + 1] = self.range_at[i]
            for buffer in buffers[i]:
                self.ranges[2 * self.range_at[i + 1]] = cnp.PyArray_BYTES(buffer)
                self.ranges[2 * self.range_at[i + 1] + 1] = cnp.PyArray_BYTES(buffer) + cnp.PyArray_NBYTES(buffer)
                self.range_at[i + 1] += 1
        # The exchange table, if it describes the parameters as their dtype says.
        self.read_layout = _dltensor_reader(exchange) if self.n and self._is_plain(self.params[0]) else NULL
        if self.read_layout != NULL and not self._learn_dtype(self.params[0]):
            self.read_layout = NULL
        self.views = []
        for i in range(self.n):
            dim = numels[i]
            Py_INCREF(descr)  # NewFromDescr steals a reference
            self.views.append(PyArray_NewFromDescr(
                <PyTypeObject*>cnp.ndarray, descr, 1, &dim, NULL, <void*>_unused,
                cnp.NPY_ARRAY_C_CONTIGUOUS | cnp.NPY_ARRAY_ALIGNED, None))
        self.owned_views = tuple(self.views)   # (the list is handed to the kernels)
        for i in range(self.n):
            self.view_refs[i] = <PyObject*>self.owned_views[i]
        self.refs = [None] * self.n
        self.grads = [None] * self.n
        self.missing = []
        self.odd = []

    def __dealloc__(self):
        free(self.param_ptrs)
        free(self.nbytes)
        free(self.stride_at)
        free(self.want_strides)
        free(self.range_at)
        free(self.ranges)
        free(self.param_refs)
        free(self.state_refs)
        free(self.tensor_refs)
        free(self.view_refs)
        free(self.plain_types)

    cdef bint _learn_dtype(self, object param) except -1:
        """Record ``param``'s dtype as the exchange table gives it; False if the
        table does not describe ``param`` (then it is not used)."""
        cdef DLTensor d
        if self.read_layout(<void*>param, &d) != 0:
            PyErr_Clear()
            return False
        if d.device.device_type != DL_CPU or <Py_ssize_t>d.data != self.param_ptrs[0] or d.dtype.lanes != 1:
            return False
        self.dl_dtype = d.dtype
        return True

    cdef inline bint _is_plain(self, object t) noexcept:
        cdef PyTypeObject* kind = Py_TYPE(t)
        cdef Py_ssize_t k
        for k in range(self.n_plain):
            if kind == self.plain_types[k]:
                return True
        return False

    cdef inline object _grad(self, object p):
        if self.direct_methods and self._is_plain(p):
            return fd_get(self.grad_attribute, p)
        return p.grad

    cdef inline object _method(self, object method, object t):
        if self.direct_methods and self._is_plain(t):
            return fd_call_noargs(method, t)
        return _call(method, t)

    def collect(self, WrittenSpans written=None):
        """Read every parameter's ``.grad`` into ``grads`` and point ``views`` at them.

        Returns COMPLETE if every gradient is present and viewed; STALE if a cached
        view may no longer show its tensor; else PARTIAL, with ``missing`` listing
        the positions without a gradient and ``odd`` those whose gradient cannot
        be viewed as it is (another layout, size or dtype, misaligned, a negative
        or conjugate view, sharing memory with a buffer the kernel writes for its
        parameter or with a span of ``written``, not a strided tensor): the caller
        copies, checks closer or rejects them.
        """
        return self._collect(written)

    cdef int _collect(self, WrittenSpans written) except -2:
        cdef Py_ssize_t i, k
        cdef object p, g, ref
        cdef PyObject* state
        cdef PyObject** tensors
        cdef char* data
        cdef list grads = self.grads
        cdef bint complete = True, viewable
        if len(grads) != self.n:
            raise ValueError("BucketViews.grads was resized")
        if self.missing:
            self.missing = []
        if self.odd:
            self.odd = []
        for i in range(self.n):
            p = <object>self.param_refs[i]
            if self._data(p) != <char*>self.param_ptrs[i]:
                return STALE
            state, tensors = self.state_refs[i], self.tensor_refs + i * self.n_keys
            for k in range(self.n_keys):
                if PyDict_GetItemWithError(<object>state, self.keys[k]) != tensors[k]:
                    return STALE
            g = self._grad(p)
            grads[i] = g
            if g is None:
                self.missing.append(i)
                self.refs[i] = None
                complete = False
                continue
            viewable = self._viewable(i, g, &data, written)
            if viewable:
                ref = self.refs[i]
                if ref is None or <object>PyWeakref_GetObject(ref) is not g:
                    # Not the object accepted at the previous step: its bits too.
                    if self._method(self.is_neg, g) or (self.complex_ and self._method(self.is_conj, g)):
                        viewable = False
                    else:
                        try:
                            self.refs[i] = PyWeakref_NewRef(g, None)
                        except TypeError:
                            self.refs[i] = None
            if not viewable:
                self.refs[i] = None
                self.odd.append(i)
                complete = False
                continue
            (<PyArrayObject_fields*>self.view_refs[i]).data = data if data != NULL else <char*>_unused
        return COMPLETE if complete else PARTIAL

    cdef char* _data(self, object param) except? NULL:
        """Where ``param``'s elements are (NULL if that cannot be read)."""
        cdef DLTensor d
        if self.read_layout != NULL and self._is_plain(param):
            if self.read_layout(<void*>param, &d) != 0:
                PyErr_Clear()
                return NULL
            return <char*>d.data
        try:
            return <char*><Py_ssize_t>self._method(self.data_ptr, param)
        except RuntimeError:  # it lost its storage
            return NULL

    cdef bint _viewable(self, Py_ssize_t i, object g, char** data, WrittenSpans written) except -1:
        """True if gradient ``g`` can be viewed as ``views[i]`` (its layout, dtype,
        size, alignment and memory checked, against ``written`` too unless None;
        not its negative and conjugate bits), with its elements' address in ``data``."""
        cdef DLTensor d
        cdef char* ptr
        cdef Py_ssize_t k
        cdef Py_ssize_t size = self.nbytes[i]
        if self.read_layout != NULL and self._is_plain(g):
            if self.read_layout(<void*>g, &d) != 0:  # not strided, no storage...
                PyErr_Clear()
                return False
            if (d.device.device_type != DL_CPU or d.dtype.code != self.dl_dtype.code
                    or d.dtype.bits != self.dl_dtype.bits or d.dtype.lanes != self.dl_dtype.lanes
                    or not self._laid_out(i, &d)):
                return False
            ptr = <char*>d.data
        else:  # any other object: through its Python methods
            try:
                if self.strides[i] is None:
                    if not _call(self.is_contiguous, g):
                        return False
                elif _call(self.stride_of, g) != self.strides[i]:
                    return False
                if g.dtype is not self.torch_dtype or not g.is_cpu or g.nbytes != size:
                    return False
                ptr = <char*><Py_ssize_t>_call(self.data_ptr, g)
            except (RuntimeError, TypeError, AttributeError):  # sparse, another kind of object...
                return False
        if <Py_ssize_t>ptr % self.itemsize != 0 or (ptr == NULL and size != 0):
            return False
        if size:
            for k in range(self.range_at[i], self.range_at[i + 1]):
                if ptr < self.ranges[2 * k + 1] and self.ranges[2 * k] < ptr + size:
                    return False
            if written is not None and written._hits(<size_t>ptr, <size_t>ptr + <size_t>size):
                return False
        data[0] = ptr
        return True

    cdef bint _laid_out(self, Py_ssize_t i, const DLTensor* d) noexcept:
        """True if ``d`` holds ``nbytes[i]`` bytes, C-contiguous or with the strides
        wanted of gradient ``i`` (contiguous as torch's ``is_contiguous`` says:
        the stride of a dimension of size 1 does not matter)."""
        cdef Py_ssize_t k, first = self.stride_at[i], n_strides = self.stride_at[i + 1] - self.stride_at[i]
        cdef int64_t numel = 1, expected = 1
        for k in range(d.ndim):
            numel *= d.shape[k]
        if numel * ((d.dtype.bits * d.dtype.lanes) // 8) != self.nbytes[i]:
            return False
        if self.strides[i] is not None:
            if d.ndim != n_strides:
                return False
            for k in range(n_strides):
                if d.strides[k] != self.want_strides[first + k]:
                    return False
            return True
        if numel == 0:
            return True
        for k in range(d.ndim - 1, -1, -1):
            if d.shape[k] != 1:
                if d.strides[k] != expected:
                    return False
                expected *= d.shape[k]
        return True

    def release(self):
        """Drop the references to the gradients (at the end of a step), so that
        ``zero_grad`` frees their memory."""
        self._release()

    cdef int _release(self) except -1:
        cdef Py_ssize_t i
        for i in range(self.n):
            self.grads[i] = None
        return 0


# ------------------------------------------------------------------- step counts
cdef int _uniform_count(cnp.ndarray steps, double* count) except -1:
    """1 and the common value of ``steps`` (a 1-D contiguous float32 or float64 array
    of at least one element: a bucket's step counts or one of its scalar states) in
    ``count``, or 0 if they differ (or one is NaN)."""
    cdef Py_ssize_t i, n = cnp.PyArray_DIM(steps, 0)
    cdef float* f
    cdef double* d
    cdef double first
    if cnp.PyArray_TYPE(steps) == cnp.NPY_FLOAT32:
        f = <float*>cnp.PyArray_DATA(steps)
        first = f[0]
        for i in range(1, n):
            if f[i] != f[0]:
                return 0
    else:
        d = <double*>cnp.PyArray_DATA(steps)
        first = d[0]
        for i in range(1, n):
            if d[i] != d[0]:
                return 0
    if first != first:
        return 0
    count[0] = first
    return 1


cdef double _next_count(cnp.ndarray steps, double count):
    """``count + 1`` as torch adds it to a step tensor of the dtype of ``steps``
    (float32 stops counting exactly at 2**24)."""
    if cnp.PyArray_TYPE(steps) == cnp.NPY_FLOAT32:
        return <double><float>(count + 1.0)
    return count + 1.0


cdef int _set_counts(cnp.ndarray steps, double value) except -1:
    cdef Py_ssize_t i, n = cnp.PyArray_DIM(steps, 0)
    cdef float* f
    cdef double* d
    if cnp.PyArray_TYPE(steps) == cnp.NPY_FLOAT32:
        f = <float*>cnp.PyArray_DATA(steps)
        for i in range(n):
            f[i] = <float>value
    else:
        d = <double*>cnp.PyArray_DATA(steps)
        for i in range(n):
            d[i] = value
    return 0


cdef inline double _element(cnp.ndarray values, Py_ssize_t k) noexcept:
    """Element ``k`` of a float32 or float64 array of step counts or scalar states."""
    if cnp.PyArray_TYPE(values) == cnp.NPY_FLOAT32:
        return (<float*>cnp.PyArray_DATA(values))[k]
    return (<double*>cnp.PyArray_DATA(values))[k]


cdef bint _uniform_scalars(tuple scalars) except -1:
    """True if every array of ``scalars`` (a bucket's scalar states) holds one value (not NaN)."""
    cdef double value
    cdef object values
    for values in scalars:
        if not _uniform_count(values, &value):
            return False
    return True


cdef tuple _scalar_values(tuple scalars, Py_ssize_t k):
    """The scalar states of parameter ``k`` as fastdescent.torch reads them from the
    state tensors (optimizers._scalar_state_value): a float, or a ``numpy.float64``
    from a float64 tensor (NAdam rounds ``mu_product`` in the tensor's dtype)."""
    cdef object values
    cdef double value
    cdef list out = []
    for values in scalars:
        value = _element(<cnp.ndarray>values, k)
        out.append(value if cnp.PyArray_TYPE(<cnp.ndarray>values) == cnp.NPY_FLOAT32 else _FLOAT64(value))
    return tuple(out)


cdef int _check_steps(object steps) except -1:
    if steps is None:
        return 0
    if (not isinstance(steps, cnp.ndarray) or cnp.PyArray_NDIM(<cnp.ndarray>steps) != 1
            or not cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>steps)
            or cnp.PyArray_TYPE(<cnp.ndarray>steps) not in (cnp.NPY_FLOAT32, cnp.NPY_FLOAT64)
            or cnp.PyArray_DIM(<cnp.ndarray>steps, 0) < 1 or not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>steps)):
        raise ValueError("step counts and scalar states must be non-empty, writable, contiguous 1-D float32 or "
                         "float64 arrays")
    return 0


def uniform_count(steps):
    """The common step count of ``steps`` (a non-empty float32 or float64 array: the
    ``state["step"]`` of a bucket's parameters) as a float, or None if they differ."""
    cdef double count
    _check_steps(steps)
    return count if _uniform_count(steps, &count) else None


def next_count(steps, double count):
    """``count + 1`` in the dtype of ``steps``, as torch counts (a float)."""
    _check_steps(steps)
    return _next_count(steps, count)


# ---------------------------------------------------------------------- the step
cdef class DirectKernel:
    """A rule kernel's direct entry (src/kernels/_direct.pxi: the kernel of its ``def``
    entry, handed data pointers and C doubles, with no argument parsing and no
    per-array checks), for the calls of one :class:`~fastdescent._runtime.KernelCall`
    (``invoke``) on arrays checked already. ``roles`` are that call's roles
    (``params``, ``grads``, then the rule's buffers in declared order) and
    ``scalars`` the names of its scalars: its ``constants``, then its ``varying``.
    ``bind(backend)`` finds the backend module's entry that takes exactly those."""

    cdef readonly object invoke
    cdef readonly str kernel
    cdef tuple roles, scalars
    cdef object backend          # the backend module bound last (None: none yet)
    cdef direct_fn fn            # its entry, NULL if it has none that fits
    cdef int* role_of            # the entry's role j is our role role_of[j]
    cdef int* scalar_of          # the entry's scalar j is our scalar scalar_of[j]

    def __cinit__(self):
        self.role_of = self.scalar_of = NULL

    def __init__(self, invoke, str kernel not None, tuple roles not None, tuple scalars not None):
        if len(set(roles)) != len(roles) or len(set(scalars)) != len(scalars) or roles[:2] != ("params", "grads"):
            raise ValueError("roles (params, grads, buffers...) and scalars are distinct names")
        self.invoke, self.kernel, self.roles, self.scalars = invoke, kernel, roles, scalars
        self.role_of = <int*>malloc(len(roles) * sizeof(int))
        self.scalar_of = <int*>malloc(max(1, len(scalars)) * sizeof(int))
        if self.role_of == NULL or self.scalar_of == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.role_of)
        free(self.scalar_of)

    cdef bint bind(self, object backend) except -1:
        """True if ``backend`` has a direct entry for our kernel, roles and scalars."""
        if backend is self.backend:
            return self.fn != NULL
        self.fn, self.backend = NULL, None
        self.fn = <direct_fn>find_direct_entry(backend, self.kernel, self.roles, self.scalars, self.role_of,
                                               self.scalar_of)
        self.backend = backend
        return self.fn != NULL


cdef class BucketStep:
    """One kernel call of a :class:`StepPlan`: the gradients of a bucket
    (``views``, a :class:`BucketViews`), the flat views of its parameters, its state
    buffers as the rule's kernel takes them (one list of views, or None, per
    buffer the rule declares), the parameter tensors (whose version counters a step
    bumps), ``steps``, a view of every parameter's ``state["step"]`` (None for a
    rule that does not count steps), ``scalars``, one such view per scalar state of
    the rule (NAdam's ``mu_product``; ``()`` for a rule that keeps none), and
    ``scratch``: ``(position, block, parameter)``
    for the gapped parameters, stepped in their scratch block (gathered with
    ``block.copy_(parameter)`` before the kernel, scattered back after it), and
    ``stored``: for a bucket in low-precision storage, the
    ``fastdescent._runtime.StoredCall`` its kernel is called through (None: the
    arrays go to the kernel as they are)."""

    cdef BucketViews views
    cdef list param_views, params
    cdef tuple buffers, scratch, scalars
    cdef object steps, stored
    # The rows of a direct kernel call (see DirectKernel), made for ``direct``'s
    # binding of ``backend``: every role's data pointers but the gradients', which
    # each step writes at role ``grad_role``.
    cdef DirectKernel direct
    cdef object backend
    cdef void** rows
    cdef Py_ssize_t* offsets
    cdef Py_ssize_t n_roles, grad_role
    cdef int typenum

    def __cinit__(self):
        self.rows, self.offsets = NULL, NULL

    def __dealloc__(self):
        free(self.rows)
        free(self.offsets)

    cdef bint direct_rows(self, DirectKernel direct, object backend) except -1:
        """True if the bucket's call can go through ``direct``'s entry on ``backend``
        (then ``rows`` and ``offsets`` are ready but for the gradients)."""
        cdef Py_ssize_t t, j, n = self.views.n, role
        cdef object arrays
        cdef cnp.ndarray a
        if direct is self.direct and backend is self.backend:
            return self.rows != NULL
        free(self.rows)
        free(self.offsets)
        self.rows, self.offsets, self.direct, self.backend = NULL, NULL, direct, backend
        if not direct.bind(backend) or n == 0 or len(self.buffers) != len(direct.roles) - 2:
            return False
        self.typenum = cnp.PyArray_TYPE(<cnp.ndarray>self.param_views[0])
        if self.typenum != cnp.NPY_FLOAT32 and self.typenum != cnp.NPY_FLOAT64:
            return False
        self.n_roles = len(direct.roles)
        rows = <void**>malloc(n * self.n_roles * sizeof(void*))
        offsets = <Py_ssize_t*>malloc((n + 1) * sizeof(Py_ssize_t))
        if rows == NULL or offsets == NULL:
            free(rows)
            free(offsets)
            raise MemoryError()
        offsets[0] = 0
        for t in range(n):
            offsets[t + 1] = offsets[t] + cnp.PyArray_SIZE(<cnp.ndarray>self.param_views[t])
            for j in range(self.n_roles):
                role = direct.role_of[j]
                if role == 1:
                    self.grad_role = j
                    rows[t * self.n_roles + j] = NULL
                    continue
                arrays = self.param_views if role == 0 else self.buffers[role - 2]
                if arrays is None:
                    rows[t * self.n_roles + j] = NULL
                else:
                    a = <cnp.ndarray>(<list>arrays)[t]
                    rows[t * self.n_roles + j] = cnp.PyArray_DATA(a)
        self.rows, self.offsets = rows, offsets
        return True

    cdef int call_direct(self, tuple constants, tuple varying, int n_threads) except -1:
        """The bucket's kernel call through its direct rows (``direct_rows`` was True):
        0 if it ran, 1 if not (a scalar that is not a float or a bool, or the entry
        declined: then nothing was written)."""
        cdef DirectKernel direct = self.direct
        cdef Py_ssize_t t, n = self.views.n, n_scalars = len(direct.scalars)
        cdef double* scalars = <double*>malloc(max(1, n_scalars) * sizeof(double))
        cdef DirectCall call
        if scalars == NULL:
            raise MemoryError()
        try:
            if len(constants) + len(varying) != n_scalars or n_threads < 1:
                return 1
            if not direct_scalars(direct.scalar_of, n_scalars, constants, varying, NULL, scalars):
                return 1
            for t in range(n):
                self.rows[t * self.n_roles + self.grad_role] = cnp.PyArray_DATA(
                    <cnp.ndarray>self.views.view_refs[t])
            call.rows, call.offsets, call.n_tensors, call.n_roles = self.rows, self.offsets, n, self.n_roles
            call.typenum, call.n_threads, call.scalars = self.typenum, n_threads, scalars
            return direct.fn(&call)
        finally:
            free(scalars)

    def __init__(self, BucketViews views not None, list param_views not None, tuple buffers not None,
                 list params not None, steps, tuple scalars not None, tuple scratch not None, stored=None):
        if len(param_views) != views.n or len(params) != views.n:
            raise ValueError("a bucket's parameters, views and gradients differ in number")
        for values in (steps, *scalars):
            _check_steps(values)
            if values is not None and cnp.PyArray_DIM(<cnp.ndarray>values, 0) != views.n:
                raise ValueError("one step count and scalar state per parameter")
        self.views, self.param_views, self.buffers, self.params, self.steps = views, param_views, buffers, params, steps
        self.scalars, self.scratch, self.stored = scalars, scratch, stored


cdef class GroupStep:
    """What a :class:`StepPlan` checks and uses of one parameter group: the group's
    dict, its parameter list and the parameters in it (``params``), the values of its
    other keys (``keys``) when they were last validated (``values``: the very
    objects), the parameters that had neither state nor a gradient (``pending``), the
    group's kernel scalars (``arguments``: ``get(step, grad_scale, fresh)`` gives
    ``(invoke, constants, varying)``; for a rule with scalar state, ``stateful(step,
    grad_scale, fresh, values)`` gives ``(invoke, constants, varying, after)`` from
    the scalar states before the step and after it, tuples; else None), the direct entry of ``invoke`` (``direct``, a
    :class:`DirectKernel`, or None), whether the scalars depend on the step number
    (``step_in_math``) and its buckets (:class:`BucketStep`)."""

    cdef readonly object group
    cdef object param_list
    cdef tuple params, pending
    cdef public tuple keys, values
    cdef public object arguments, stateful
    cdef public DirectKernel direct
    cdef bint step_in_math
    cdef list buckets

    def __init__(self, dict group not None, list param_list not None, tuple params not None, tuple keys not None,
                 tuple values not None, tuple pending not None, arguments, stateful, DirectKernel direct,
                 bint step_in_math, list buckets not None):
        cdef object bucket
        for bucket in buckets:
            if type(bucket) is not BucketStep:
                raise TypeError("buckets must be BucketStep objects")
            if (<BucketStep>bucket).scalars and stateful is None:
                raise ValueError("a bucket with scalar states needs a stateful")
        self.group, self.param_list, self.params, self.keys, self.values = group, param_list, params, keys, values
        self.pending, self.arguments, self.stateful, self.direct = pending, arguments, stateful, direct
        self.step_in_math = step_in_math
        self.buckets = buckets

    cdef bint same_parameters(self, object group):
        """True if ``group`` is this group's dict with the same parameter list,
        holding the very same parameters."""
        cdef PyObject* item
        cdef list params
        cdef Py_ssize_t k
        if group is not self.group:
            return False
        item = PyDict_GetItem(group, "params")
        if item == NULL or <object>item is not self.param_list:
            return False
        params = self.param_list
        if len(params) != len(self.params):
            return False
        for k in range(len(params)):
            if params[k] is not self.params[k]:
                return False
        return True

    cdef bint same_values(self):
        """True if every key besides ``params`` holds the object last validated (and
        no key was added)."""
        cdef PyObject* item
        cdef Py_ssize_t k
        cdef dict group = self.group
        if len(group) != len(self.keys) + 1:
            return False
        for k in range(len(self.keys)):
            item = PyDict_GetItem(group, self.keys[k])
            if item == NULL or <object>item is not self.values[k]:
                return False
        return True


cdef object _ONE = 1.0   # the gradient scale of every step (GradScaler unscales the gradients itself)


cdef class StepPlan:
    """A step of a ``fastdescent.torch`` optimizer while nothing but the gradients
    (and the hyperparameter values) changes, in C.

    The optimizer builds it after a step that went its general way and uses it until
    :meth:`run` returns False, which it does, before writing anything, when the
    optimizer's ``param_groups`` list, a group, its parameter list or a parameter in
    it, or the ``state`` mapping was replaced; when a pending parameter got a
    gradient; when a bucket has a gradient that is not viewable as it is (or may
    share memory with what the step writes: ``written``, a :class:`WrittenSpans` of
    every group's parameters and state), or a cached view is stale
    (``BucketViews.collect``); or when a step count or scalar state
    is NaN. The parameters without a gradient are skipped; a bucket whose step
    counts or scalar states differ gets one kernel call per count and states. A group whose values are not the objects last validated is handed
    to ``refresh(index, group_step)`` (the optimizer's): it validates them again and
    updates the :class:`GroupStep` (True), raises for a bad value, or returns False.
    Then every bucket's kernel scalars are taken (the rule's ``step_scalars`` for
    the new step count; with scalar states, ``stateful`` for the count and states),
    and only then written: one kernel call per bucket, the step counts, the scalar
    states, the parameters' version counters (``increment_version(list)``), with
    the gapped parameters gathered into their scratch blocks and scattered back.
    ``fresh`` is the "no buffer created" marker the kernel scalars key on.
    """

    cdef object param_groups, state, increment_version, fresh
    cdef list groups
    cdef WrittenSpans written

    def __init__(self, list param_groups not None, state, list groups not None, increment_version, fresh,
                 WrittenSpans written not None):
        cdef object group
        for group in groups:
            if type(group) is not GroupStep:
                raise TypeError("groups must be GroupStep objects")
        self.param_groups, self.state, self.groups = param_groups, state, groups
        self.increment_version, self.fresh, self.written = increment_version, fresh, written

    def run(self, object param_groups, object state, object backend, object n_threads, object refresh):
        """Take the step with the kernels of ``backend`` on ``n_threads``; False if
        the optimizer must take its general way instead (nothing written then).
        (``refresh`` comes with each call: a plan that kept it would keep its
        optimizer alive in a reference cycle.)"""
        cdef Py_ssize_t g, n = len(self.groups)
        cdef GroupStep group
        cdef BucketStep bucket
        # (bucket, positions or None for all, step count after the step or None, the step number the kernel
        #  scalars are for, kernel call, DirectKernel, scalar states after the step or None)
        cdef list parts = []
        cdef double count
        cdef object p, positions, following, values
        cdef int status
        if param_groups is not self.param_groups or state is not self.state or len(<list>param_groups) != n:
            return False
        for g in range(n):
            group = <GroupStep>self.groups[g]
            if not group.same_parameters((<list>param_groups)[g]):
                return False
            if not group.same_values() and not refresh(g, group):
                return False
            for p in group.pending:
                if p.grad is not None:  # its first gradient: its state is created on the general way
                    return False
        try:
            for group in self.groups:
                for bucket in group.buckets:
                    status = bucket.views._collect(self.written)
                    if status == STALE or bucket.views.odd:  # (a gradient to copy or refuse)
                        return False
                    if (status == COMPLETE and (bucket.steps is None or _uniform_count(bucket.steps, &count))
                            and _uniform_scalars(bucket.scalars)):
                        following = None if bucket.steps is None else _next_count(bucket.steps, count)
                        parts.append(self._part(group, bucket, None, following, _scalar_values(bucket.scalars, 0)))
                    elif bucket.stored is not None:  # (its StoredCall takes the whole bucket)
                        return False
                    else:  # some gradients missing, or counts or states that differ: one call per count and states
                        by_key = _by_key(bucket.steps, bucket.scalars, bucket.views.missing, bucket.views.n)
                        if by_key is None:
                            return False
                        for (following, values), positions in (<dict>by_key).items():
                            parts.append(self._part(group, bucket, positions, following, values))
            # The writes.
            for bucket, positions, following, step, call, direct, after in parts:
                self._write(bucket, positions, following, step, call, direct, after, backend, n_threads)
            return True
        finally:
            for group in self.groups:
                for bucket in group.buckets:
                    bucket.views._release()

    cdef tuple _part(self, GroupStep group, BucketStep bucket, object positions, object following, tuple values):
        """A kernel call of the step: its scalars for the step count ``following``
        and the scalar states ``values``, and those states after the step (checked
        here, before any write: floats, one per state)."""
        cdef object step = None
        cdef tuple after
        if following is not None and group.step_in_math:
            step = int(<double>following)
        if not bucket.scalars:
            return (bucket, positions, following, step, group.arguments.get(step, _ONE, self.fresh), group.direct,
                    None)
        invoke, constants, varying, after = group.stateful(step, _ONE, self.fresh, values)
        if len(after) != len(bucket.scalars):
            raise ValueError("stateful gave the wrong number of scalar states")
        return (bucket, positions, following, step, (invoke, constants, varying), group.direct,
                tuple([float(value) for value in after]))

    cdef int _write(self, BucketStep bucket, object positions, object following, object step, tuple call,
                    DirectKernel direct, object after, object backend, object n_threads) except -1:
        """Step the parameters of ``bucket`` at ``positions`` (None: all of them): the
        whole bucket through ``direct`` where it can, else through the call's
        ``invoke`` (a stored bucket: its ``stored``, for step number ``step``); then
        set their step counts to ``following`` and scalar states to ``after``."""
        cdef object invoke, constants, varying, params, grads, buffers, tensors, chosen = None
        cdef Py_ssize_t k, j
        invoke, constants, varying = call
        if positions is None:
            params, grads, buffers, tensors = bucket.param_views, bucket.views.views, bucket.buffers, bucket.params
        else:
            params, grads = _pick(bucket.param_views, positions), _pick(bucket.views.views, positions)
            buffers = tuple([None if b is None else _pick(b, positions) for b in bucket.buffers])
            tensors, chosen = _pick(bucket.params, positions), set(positions)
        for position, block, target in bucket.scratch:
            if chosen is None or position in chosen:
                block.copy_(target)
        if bucket.stored is not None:
            bucket.stored.call(backend, invoke, grads, constants, varying, n_threads, step)
        elif not (positions is None and direct is not None and invoke is direct.invoke and type(n_threads) is int
                  and bucket.direct_rows(direct, backend) and bucket.call_direct(constants, varying, n_threads) == 0):
            invoke(backend, params, grads, buffers, constants, varying, n_threads)
        for position, block, target in bucket.scratch:
            if chosen is None or position in chosen:
                target.copy_(block)
        if following is not None:
            if positions is None:
                _set_counts(bucket.steps, <double>following)
            else:
                for k in positions:
                    bucket.steps[k] = following
        if after is not None:
            for j in range(len(bucket.scalars)):
                if positions is None:
                    _set_counts(bucket.scalars[j], <double>(<tuple>after)[j])
                else:
                    for k in positions:
                        bucket.scalars[j][k] = (<tuple>after)[j]
        # NumPy writes bypass autograd's version counters: bump them as torch's
        # in-place updates would, so that a stale saved tensor is still detected.
        self.increment_version(tensors)
        return 0


cdef list _pick(list items, list positions):
    cdef Py_ssize_t k
    return [items[k] for k in positions]


cdef object _by_key(object steps, tuple scalars, list missing, Py_ssize_t n):
    """{(step count after the step (None without counts), scalar states): [positions]}
    for the positions not in ``missing``, in order; None if a count or state is NaN."""
    cdef Py_ssize_t k
    cdef set absent = set(missing)
    cdef dict parts = {}
    cdef double count
    cdef object following
    cdef tuple values
    cdef cnp.ndarray counts = steps
    for k in range(n):
        if k in absent:
            continue
        following = None
        if steps is not None:
            count = _element(counts, k)
            if count != count:
                return None
            following = _next_count(counts, count)
        values = _scalar_values(scalars, k)
        for value in values:
            if value != value:
                return None
        key = (following, values)
        positions = parts.get(key)
        if positions is None:
            parts[key] = [k]
        else:
            (<list>positions).append(k)
    return parts
