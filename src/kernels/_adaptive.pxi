# Element-level pieces shared by the adaptive rules (Adagrad, RMSprop, Adam): the
# gradient as the update sees it, a root in the buffer's precision, PyTorch's lerp
# and the exponential average of squares. The NumPy twins of these operations are
# in fastdescent/reference/_adaptive.py.

from libc.math cimport sqrt, sqrtf


cdef inline floating root(floating x) noexcept nogil:
    # sqrtf for float32: one correctly rounded vector sqrt, no round trip via double.
    if floating is float:
        return sqrtf(x)
    else:
        return sqrt(x)


cdef inline floating scaled_grad(floating g, floating p, floating scale, floating wd,
                                 bint has_wd) noexcept nogil:
    """The gradient times ``scale`` (negative for maximize), plus coupled L2 decay."""
    cdef floating d = scale * g
    if has_wd:
        d = d + wd * p
    return d


# torch.lerp(a, b, w) = a + w*(b - a) for w < 0.5, else b - (1 - w)*(b - a): each
# form is exact at its end (w = 1 gives b). The averages below take w = 1 - decay.
cdef struct Lerp:
    bint from_end
    double weight


cdef inline Lerp lerp_toward(double decay) noexcept nogil:
    """The lerp that moves an average toward a new value by 1 - ``decay``."""
    cdef Lerp l
    l.weight = 1.0 - decay
    l.from_end = not (l.weight < 0.5)
    return l


cdef inline floating lerp(floating a, floating b, floating w, floating w_rest,
                          bint from_end) noexcept nogil:
    """``w`` = <floating>weight, ``w_rest`` = <floating>(1 - weight), both from a Lerp."""
    cdef floating diff = b - a
    if from_end:
        return b - w_rest * diff
    return a + w * diff


cdef inline floating average_square(floating s, floating d, floating keep,
                                    floating weight) noexcept nogil:
    """keep*s + weight*d*d, in the order of PyTorch's ``s.mul_(keep).addcmul_(d, d, value=weight)``."""
    return keep * s + (weight * d) * d


# A loop that overwrites an array without using its values (ASGD's average before
# averaging starts, Muon's Nesterov update) still moves the array's bytes in: a store
# to a line not in cache waits for that line (the read for ownership), and a stream
# of such stores ran at 60-75% of the speed of the same bytes read, then written
# (10^8 float32 on 2 threads). Such a loop reads each old element with old_bits and
# hands the OR of them to keep_bits: the lines then arrive by the loads' path, which
# keeps more misses in flight, and the loop runs at the bandwidth ceiling of its
# byte count, that read included. The values are never used.
cdef extern from *:
    """
    static volatile unsigned long long fastdescent_old_bits_sink;
    """
    unsigned long long fastdescent_old_bits_sink


cdef inline unsigned long long old_bits(const floating* a, Py_ssize_t i) noexcept nogil:
    """The bit pattern of ``a[i]`` (an integer OR vectorizes where a float reduction would not)."""
    if floating is float:
        return (<const unsigned int*>a)[i]
    else:
        return (<const unsigned long long*>a)[i]


cdef inline void keep_bits(unsigned long long seen) noexcept nogil:
    """Keep the loads that made ``seen``: a store the compiler cannot drop, which
    (almost) never happens, so that threads do not share a line at every call."""
    global fastdescent_old_bits_sink
    if seen == 1:
        fastdescent_old_bits_sink = seen
