# The direct way into a rule kernel: what fastdescent._runtime (the faces and the
# optimizers' step plans) hands a kernel variant's entry, through a PyCapsule, once
# it has checked every array and computed the scalars. Included by _runtime.pyx
# and by the kernel variants (_direct.pxi), so both sides share one layout.

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
