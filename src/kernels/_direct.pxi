# Direct entries of the rule kernels (issue 13): the same kernel as the ``def``
# entry, without its keyword parsing, its lists and its plan allocations, for a
# caller that has checked everything already (fastdescent._runtime's Face
# and StepPlan). A rule's .pxi registers one with ``register_direct`` at its end:
# its ``def`` entry, whose parameters name the roles and scalars in their order,
# and a function filling the rule's args struct from the doubles of a DirectCall.

from cpython.pycapsule cimport PyCapsule_New

include "_direct_abi.pxi"

cdef dict DIRECT_ENTRIES = {}

cdef enum:
    # A direct call on one thread of at most this many elements keeps the GIL: it
    # takes a few microseconds at most, and releasing the GIL and taking it back
    # would add a tenth of one to a call of 10**3 (NumPy keeps it for small loops too).
    DIRECT_KEEP_GIL = 4096


def direct_entries():
    """``{kernel: (capsule, roles, scalars)}``: the kernels with a direct entry, the
    roles (buffer names, params and grads first) and scalars it takes, in order."""
    return dict(DIRECT_ENTRIES)


cdef void register_direct(object entry, direct_fn fn, tuple roles=None) except *:
    """Register ``fn`` as the direct entry of the ``def`` kernel ``entry``: its
    positional parameters are the roles, its keyword-only ones the scalars, then
    ``n_threads``. ``roles``: the same names in the order the kernel's segment
    functions read the rows, where it differs from the ``def``'s (the order of
    its ``run_kernel`` tuple)."""
    cdef object code = entry.__code__
    cdef Py_ssize_t n_roles = code.co_argcount, n_keywords = code.co_kwonlyargcount
    cdef tuple names = tuple(code.co_varnames[:n_roles + n_keywords])
    if n_roles > MAX_ROLES:
        raise ValueError(f"{entry.__name__}: at most {MAX_ROLES} roles")
    if n_keywords < 1 or names[n_roles + n_keywords - 1] != "n_threads":  # (no negative indices: wraparound is off)
        raise ValueError(f"{entry.__name__}: a kernel's last parameter is n_threads")
    if roles is None:
        roles = names[:n_roles]
    elif sorted(roles) != sorted(names[:n_roles]):
        raise ValueError(f"{entry.__name__}: roles {roles} are not its parameters {names[:n_roles]}")
    DIRECT_ENTRIES[entry.__name__] = (PyCapsule_New(<void*>fn, DIRECT_CAPSULE, NULL), roles,
                                      names[n_roles:n_roles + n_keywords - 1])


cdef int run_direct(const DirectCall* call, segment_fn fn32, segment_fn fn64, const void* args) noexcept:
    """``run_kernel`` on rows gathered by the caller; 1 (nothing done) where
    run_kernel would not run the rule's loop on them directly."""
    cdef Plan plan
    cdef void* pending
    if fd_pending_accumulation.armed:
        return 1
    pending = fd_take_pending_storage()
    if pending != NULL:
        fd_set_pending_storage(pending)
        return 1
    plan.n_tensors, plan.n_roles, plan.typenum = call.n_tensors, call.n_roles, call.typenum
    plan.offsets, plan.rows = call.offsets, call.rows
    plan.total = call.offsets[call.n_tensors]
    plan.n_parts = choose_parts(plan.total, call.n_threads)
    if plan.n_parts == 1 and plan.total <= DIRECT_KEEP_GIL:
        run_plan(&plan, fn32 if call.typenum == cnp.NPY_FLOAT32 else fn64, args)
        call_finished()
        return 0
    with nogil:
        run_plan(&plan, fn32 if call.typenum == cnp.NPY_FLOAT32 else fn64, args)
        call_finished()
    return 0
