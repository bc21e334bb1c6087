# The per-step reads of fastdescent.torch in one C loop: the gradients of a bucket of
# parameters as NumPy views, and the checks that the cached views of the parameters
# and their state still show the tensors' memory.
#
# fastdescent.torch steps tensors with the NumPy-facing kernels. Viewing a gradient
# with ``Tensor.numpy()`` costs about 0.8 us, and a step on a small model has a
# hundred of them. Here each gradient has one flat ndarray that owns no memory and
# is pointed at the gradient's data before each step. Reaching a gradient costs its
# ``.grad``, ``data_ptr()`` and ``_version`` (which in-place changes of its shape or
# strides bump); a gradient object not accepted at the previous step, or changed
# since, also has its layout, size, alignment and aliasing checked.
#
# The module never imports torch: the caller passes the tensor methods it uses. The
# views are private to fastdescent.torch and are read only while the caller holds
# the gradient tensors they point into (``grads``, until ``release``).

cimport numpy as cnp
from cpython.dict cimport PyDict_GetItem
from cpython.object cimport PyObject, PyTypeObject
from cpython.ref cimport Py_INCREF
from cpython.weakref cimport PyWeakref_GetObject, PyWeakref_NewRef
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

cdef double _unused[1]   # where a view points before its first gradient (aligned)

#: ``collect`` results.
STALE = -1      # a parameter's storage moved or a state tensor was replaced: rebuild
PARTIAL = 0     # see ``missing`` and ``odd``
COMPLETE = 1    # every gradient present and viewed


cdef inline object _call(object method, object tensor):
    cdef PyObject* arg = <PyObject*>tensor
    return PyObject_Vectorcall(method, &arg, 1, NULL)


cdef class BucketViews:
    """The gradients of ``params`` as flat NumPy views, refreshed by :meth:`collect`.

    ``views[i]`` is a 1-D ndarray of ``numels[i]`` elements of ``dtype`` that
    shows the gradient of ``params[i]`` after a ``collect`` that accepted it
    (``complex_``: the parameters are complex, seen as real pairs).
    ``strides[i]`` is None if that gradient must be C-contiguous, else the stride
    tuple it must have (its parameter's, for a channels_last or permuted one).
    ``buffers[i]`` are the arrays the kernel writes for parameter ``i``: its
    gradient may not share memory with any of them. ``collect`` also checks that
    ``params[i].data_ptr()`` is still ``param_ptrs[i]`` and that
    ``states[i][keys[k]] is tensors[i][k]``: the cached views are still valid.
    ``methods`` are torch's ``(Tensor.data_ptr, Tensor.is_contiguous,
    Tensor.stride, Tensor.is_neg, Tensor.is_conj)``.
    """

    cdef readonly list params, views, grads, missing, odd
    cdef list refs, buffers, strides, nbytes, param_ptrs, states, tensors
    cdef tuple keys
    cdef Py_ssize_t* ptrs
    cdef Py_ssize_t* versions
    cdef Py_ssize_t n, itemsize
    cdef bint complex_
    cdef object data_ptr, is_contiguous, stride_of, is_neg, is_conj

    def __cinit__(self):
        self.ptrs = NULL
        self.versions = NULL

    def __init__(self, list params, list param_ptrs, list states, tuple keys, list tensors,
                 list numels, dtype, bint complex_, list strides, list buffers, tuple methods):
        cdef Py_ssize_t i
        cdef cnp.npy_intp dim
        cdef cnp.dtype descr = cnp.dtype(dtype)
        self.params = list(params)
        self.n = len(self.params)
        self.param_ptrs = list(param_ptrs)
        self.states = list(states)
        self.keys = keys
        self.tensors = list(tensors)
        self.itemsize = descr.itemsize
        self.complex_ = complex_
        self.data_ptr, self.is_contiguous, self.stride_of, self.is_neg, self.is_conj = methods
        self.strides = list(strides)
        self.buffers = list(buffers)
        self.nbytes = [n * self.itemsize for n in numels]
        self.refs = [None] * self.n
        self.ptrs = <Py_ssize_t*>malloc(max(1, self.n) * sizeof(Py_ssize_t))
        self.versions = <Py_ssize_t*>malloc(max(1, self.n) * sizeof(Py_ssize_t))
        if self.ptrs == NULL or self.versions == NULL:
            raise MemoryError()
        self.views = []
        for i in range(self.n):
            self.ptrs[i] = 0
            dim = numels[i]
            Py_INCREF(descr)  # NewFromDescr steals a reference
            self.views.append(PyArray_NewFromDescr(
                <PyTypeObject*>cnp.ndarray, descr, 1, &dim, NULL, <void*>_unused,
                cnp.NPY_ARRAY_C_CONTIGUOUS | cnp.NPY_ARRAY_ALIGNED, None))
        self.grads = [None] * self.n
        self.missing = []
        self.odd = []

    def __dealloc__(self):
        free(self.ptrs)
        free(self.versions)

    def collect(self):
        """Read every parameter's ``.grad`` into ``grads`` and point ``views`` at them.

        Returns COMPLETE if every gradient is present and viewed; STALE if a cached
        view may no longer show its tensor; else PARTIAL, with ``missing`` listing
        the positions without a gradient and ``odd`` those whose gradient cannot
        be viewed as it is (another layout, size or dtype, misaligned, a negative
        or conjugate view, sharing memory with a buffer the kernel writes, not a
        strided tensor): the caller copies or rejects them.
        """
        cdef Py_ssize_t i, k, ptr
        cdef object p, g, ref, state
        cdef tuple tensors
        cdef PyObject* item
        cdef list grads = self.grads
        cdef bint complete = True
        if self.missing:
            self.missing = []
        if self.odd:
            self.odd = []
        for i in range(self.n):
            p = self.params[i]
            if _call(self.data_ptr, p) != self.param_ptrs[i]:
                return STALE
            state = self.states[i]
            tensors = <tuple>self.tensors[i]
            for k in range(len(self.keys)):
                item = PyDict_GetItem(state, self.keys[k])
                if item == NULL or <object>item is not tensors[k]:
                    return STALE
            g = p.grad
            grads[i] = g
            if g is None:
                self.missing.append(i)
                self.refs[i] = None
                complete = False
                continue
            ref = self.refs[i]
            if ref is not None and <object>PyWeakref_GetObject(ref) is g:
                # The object accepted at the previous step: unchanged if its memory is
                # where it was and no in-place operation (resize_, t_...) touched it.
                try:
                    ptr = _call(self.data_ptr, g)
                except RuntimeError:  # it lost its storage
                    ptr = -1
                if ptr == self.ptrs[i] and g._version == self.versions[i]:
                    continue
            if self._accept(i, g):
                try:
                    self.refs[i] = PyWeakref_NewRef(g, None)
                except TypeError:
                    self.refs[i] = None
            else:
                self.refs[i] = None
                self.odd.append(i)
                complete = False
        return COMPLETE if complete else PARTIAL

    cdef bint _accept(self, Py_ssize_t i, object g) except -1:
        """Check a gradient not accepted before and point ``views[i]`` at it."""
        cdef Py_ssize_t ptr
        cdef cnp.ndarray buffer, view
        cdef char* lo
        cdef Py_ssize_t size = self.nbytes[i]
        try:
            if self.strides[i] is None:
                if not _call(self.is_contiguous, g):
                    return False
            elif _call(self.stride_of, g) != self.strides[i]:
                return False
            if g.nbytes != size or _call(self.is_neg, g) or (self.complex_ and _call(self.is_conj, g)):
                return False
            ptr = _call(self.data_ptr, g)
        except (RuntimeError, TypeError, AttributeError):  # sparse, another kind of object...
            return False
        if ptr % self.itemsize != 0 or (ptr == 0 and size != 0):
            return False
        if size:
            for buffer in self.buffers[i]:
                lo = cnp.PyArray_BYTES(buffer)
                if <char*>ptr < lo + cnp.PyArray_NBYTES(buffer) and lo < <char*>ptr + size:
                    return False
        self.ptrs[i] = ptr
        self.versions[i] = g._version
        view = <cnp.ndarray>self.views[i]
        (<PyArrayObject_fields*><PyObject*>view).data = <char*>ptr
        cnp.PyArray_ENABLEFLAGS(view, cnp.NPY_ARRAY_ALIGNED)
        return True

    def release(self):
        """Drop the references to the gradients (at the end of a step), so that
        ``zero_grad`` frees their memory."""
        cdef Py_ssize_t i
        for i in range(self.n):
            self.grads[i] = None
