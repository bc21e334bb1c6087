# Direct entries of the rule kernels (issue 13): the same kernel as the ``def``
# entry, without its keyword parsing, its lists and its plan allocations, for a
# caller that has checked everything already (fastdescent._runtime's FaceRunner
# and StepPlan). A rule's .pxi registers one with ``register_direct`` at its end:
# a function filling the rule's args struct from the doubles of a DirectCall,
# and the names of the roles and scalars the ``def`` takes, in its order
# (tests/test_step_plan.py checks them against the ``def``'s signature).

from cpython.pycapsule cimport PyCapsule_New

include "_direct_abi.pxi"

cdef dict DIRECT_ENTRIES = {}


def direct_entries():
    """``{kernel: (capsule, roles, scalars)}``: the kernels with a direct entry, the
    roles (buffer names, params and grads first) and scalars it takes, in order."""
    return dict(DIRECT_ENTRIES)


cdef void register_direct(str kernel, direct_fn fn, tuple roles, tuple scalars) except *:
    if len(roles) > MAX_ROLES:
        raise ValueError(f"{kernel}: at most {MAX_ROLES} roles")
    DIRECT_ENTRIES[kernel] = (PyCapsule_New(<void*>fn, DIRECT_CAPSULE, NULL), roles, scalars)


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
    with nogil:
        run_plan(&plan, fn32 if call.typenum == cnp.NPY_FLOAT32 else fn64, args)
        call_finished()
    return 0
