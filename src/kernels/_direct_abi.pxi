# The direct way into a rule kernel: what fastdescent._runtime (the faces and the
# optimizers' step plans) and fastdescent._tensorviews (fastdescent.torch's step
# plan) hand a kernel variant's entry, through a PyCapsule, once they have checked
# every array and computed the scalars. Included by _runtime.pyx, _tensorviews.pyx
# and the kernel variants (_direct.pxi), so every side shares one layout.

from cpython.float cimport PyFloat_AS_DOUBLE

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
