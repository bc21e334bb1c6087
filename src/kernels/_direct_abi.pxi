# The direct way into a rule kernel: what fastdescent._runtime (the faces and the
# optimizers' step plans) and fastdescent._tensorviews (fastdescent.torch's step
# plan) hand a kernel variant's entry, through a PyCapsule, once they have checked
# every array and computed the scalars. Included by _runtime.pyx, _tensorviews.pyx
# and the kernel variants (_direct.pxi), so every side shares one layout.

from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.pycapsule cimport PyCapsule_GetPointer

cdef struct DirectCall:
    void** rows               # rows[t * n_roles + r]: data of role r of tensor t (NULL: role not given)
    Py_ssize_t* offsets       # n_tensors + 1 prefix sums of the tensor sizes
    Py_ssize_t n_tensors
    Py_ssize_t n_roles        # the kernel's roles, in the order of its entry (see direct_entries)
    int typenum               # NPY_FLOAT32 or NPY_FLOAT64
    int n_threads             # at least 1
    const double* scalars     # the kernel's scalars in the order of its entry; flags as 0.0 or 1.0

# 0: the kernel ran. 1: not taken (a gradient accumulation or a low-precision
# stored() call is pending in this thread): call the ``def`` entry instead.
ctypedef int (*direct_fn)(const DirectCall* call) noexcept

cdef const char* DIRECT_CAPSULE = "fastdescent.direct_kernel"


cdef inline bint direct_scalar(object value, double* out) noexcept:
    """``value`` as a direct entry takes a scalar into ``out``: a float as it is, a
    bool as 0.0 or 1.0; False for anything else (the call then goes the ``def`` way)."""
    if type(value) is float:
        out[0] = PyFloat_AS_DOUBLE(value)
    elif value is True or value is False:
        out[0] = 1.0 if value is True else 0.0
    else:
        return False
    return True


cdef void* find_direct_entry(object backend, str kernel, tuple roles, tuple scalars, int* role_map,
                             int* scalar_map) except? NULL:
    """The function of ``backend``'s direct entry for ``kernel`` if it takes exactly
    the roles ``roles`` and the scalars ``scalars`` (names, in any order), with
    ``role_map[j]`` and ``scalar_map[j]`` (arrays of ``len(roles)`` and
    ``len(scalars)``) set to our index of its role j and its scalar j; NULL, the
    maps untouched, if the backend has none that fits."""
    cdef Py_ssize_t j
    entries = getattr(backend, "direct_entries", None)
    entry = entries().get(kernel) if entries is not None else None
    if entry is None:
        return NULL
    capsule, kernel_roles, kernel_scalars = entry
    if sorted(kernel_roles) != sorted(roles) or sorted(kernel_scalars) != sorted(scalars):
        return NULL
    for j in range(len(kernel_roles)):
        role_map[j] = roles.index(kernel_roles[j])
    for j in range(len(kernel_scalars)):
        scalar_map[j] = scalars.index(kernel_scalars[j])
    return PyCapsule_GetPointer(capsule, DIRECT_CAPSULE)


cdef bint direct_scalars(const int* scalar_map, Py_ssize_t n_scalars, tuple constants, tuple varying,
                         const double* varying_doubles, double* out) except -1:
    """``out[j]``: the entry's scalar j, our scalar ``scalar_map[j]`` of
    ``constants`` then ``varying`` (``varying`` None: of the C doubles
    ``varying_doubles``); False if one is neither a float nor a bool."""
    cdef Py_ssize_t j, k, n_constants = len(constants)
    for j in range(n_scalars):
        k = scalar_map[j]
        if k < n_constants:
            value = constants[k]
        elif varying is None:
            out[j] = varying_doubles[k - n_constants]
            continue
        else:
            value = varying[k - n_constants]
        if not direct_scalar(value, out + j):
            return False
    return True
