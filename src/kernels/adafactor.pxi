# Adafactor (Shazeer & Stern 2018) as torch.optim.Adafactor: two kernels, because
# its update needs whole-tensor quantities before any element can be written.
# Equations: fastdescent.rules.adafactor. Reference twins (same operations, same
# order): fastdescent/reference/adafactor.py.
#
# * adafactor_statistics, the reductions. Sweep A reads the parameter and the
#   gradient: the sum of p^2 (the parameter's RMS), and for a factored tensor the
#   sums of g^2 along its rows and along its columns; the caller then moves
#   row_var and col_var toward the means and derives each row's and column's
#   factor of the update. Sweep B (factored tensors only) reads the gradient again
#   for the sum of u^2 (the update's RMS, which torch clips to d). An unfactored
#   tensor (fewer than two dimensions) updates ``variance`` and sums u^2 in sweep A.
# * adafactor_update, the fused elementwise update, reading the factored variance
#   through the row and column factors: p = p * param_decay + step_size * u.
#
# A factored tensor is seen as `batches` matrices of rows x cols (the last two
# dimensions; torch factors those). The results must not depend on the thread
# count, so every sum has an order fixed by the shape alone. The work is cut into
# tiles of AF_ROW_BLOCK rows of one matrix (a vector of n is one row of n columns),
# whole rows up to AF_STRIP_BYTES, else rows cut into strips of equal widths
# (af_strip_width): the rows of a tile are then one run of memory, which the
# hardware prefetchers follow as they follow the bandwidth kernel's (strips of
# 8192 columns read a 10^4-column matrix at 70% of the ceiling in sweep B, whole
# rows at 80%). Threads claim tiles several at a time (as many as hold
# CHUNK_ELEMENTS elements of the largest tile: small matrices, such as a network's
# convolution kernels, cost few claims); each tile's sums go to its own slot:
#
# * along one row of a tile, element j goes to lane j % AF_LANES; each lane adds
#   its squares in column order, in the dtype over each chunk of AF_CHUNK columns,
#   and adds each chunk's sum to a double; the lanes' doubles combine by a pairwise
#   tree: the row's sum over the tile's columns;
# * a tile's sum (of p^2, of u^2) adds its rows' sums in row order (double);
# * a tile's column sums add its rows in row order, in the dtype (at most
#   AF_ROW_BLOCK terms);
# then, in the caller, in double: a row's sum adds its tiles in column order, a
# column's sum its tiles in row order, a tensor's sum its tiles in tile order
# (matrix, rows, columns). Sums in the dtype run over at most 512 terms, so float32
# keeps about 6 digits (torch.optim sums a float32 column in float32 over all its
# rows), and the loops stay in one vector width: a conversion to double per
# element cost 30-40 % of the speed at 10^8 elements.

from libc.math cimport sqrt

import numpy as np

cdef enum:
    AF_LANES = 32        # independent sums along a row: two vectors of floats (the latency of the adds)
    AF_STRIP_BYTES = 65536  # most bytes of a row per tile (a multiple of AF_CHUNK elements): wider rows are cut
    AF_STRIP_DOUBLES = 8192  # AF_STRIP_BYTES in doubles: the tile's column sums, on the stack
    AF_ROW_BLOCK = 256   # rows per tile: the column sums of all tiles take 1/256 of a matrix (in doubles)
    AF_CHUNK = 512       # columns a lane adds in the dtype before adding the result in double
    AF_AHEAD = 4096      # bytes ahead of a run's loads that its loop asks for (prefetch_lanes)


# The loops of a factored tensor do more per element than the bandwidth ceiling's (a
# column factor, a clamp, a product, a sum), so fewer of their loads are in flight at
# once: at 10^8 float32 on 2 threads the reductions ran at about 75% of the ceiling of
# their reads. Asking for the lines AF_AHEAD bytes ahead (one prefetch per line) keeps
# more misses in flight. The values are unchanged: a prefetch only moves lines. The
# update pass has none: with prefetch_chunk it measured no faster.
# Measured no faster either (10^8 float32, 2 threads, paired with the ceiling at load
# 2-4, all within the noise of +-5 points): AF_AHEAD of 8, 16 or 32 KB; a prefetch
# 16 KB ahead in the update pass; walking the tiles of a tile row row by row (the
# matrix in memory order, each tile's sums kept apart); sweep B in reverse tile order
# (to find sweep A's last lines of g still cached).
cdef extern from *:
    """
    #define fd_prefetch_read(address) __builtin_prefetch((address), 0, 3)
    """
    void fd_prefetch_read(const void* address) noexcept nogil


cdef inline void prefetch_chunk(const floating* run, Py_ssize_t at, Py_ssize_t m, Py_ssize_t n) noexcept nogil:
    """Prefetch the lines AF_AHEAD bytes past ``run[at:at + m]`` that are in the run of
    ``n``, all at once: for a loop that cannot hold a prefetch (a call in a loop
    keeps gcc from turning its branches, such as capped's, into vector selects).
    In a test loop it recovered most, not all, of what prefetch_lanes did."""
    cdef Py_ssize_t k = at + AF_AHEAD // sizeof(floating), last = min(k + m, n)
    while k < last:
        fd_prefetch_read(run + k)
        k += 64 // sizeof(floating)


cdef inline void prefetch_lanes(const floating* run, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """Prefetch the lines AF_AHEAD bytes past ``run[i:i + AF_LANES]`` (near the run's
    end, its last element: no line past the run is fetched)."""
    cdef Py_ssize_t ahead = i + AF_AHEAD // sizeof(floating)
    fd_prefetch_read(run + min(ahead, n - 1))  # AF_LANES (32) floats span two lines, doubles four
    fd_prefetch_read(run + min(ahead + 16, n - 1))
    if floating is double:
        fd_prefetch_read(run + min(ahead + 8, n - 1))
        fd_prefetch_read(run + min(ahead + 24, n - 1))


cdef struct AfTensor:
    void* p
    void* g
    void* row_var            # NULL for an unfactored tensor
    void* col_var
    void* variance           # NULL for a factored tensor
    Py_ssize_t batches, rows, cols     # unfactored: 1, 1, size
    Py_ssize_t row_blocks, strips
    Py_ssize_t width         # columns per strip (af_strip_width; the last strip may be narrower)
    Py_ssize_t first_tile, n_tiles
    Py_ssize_t row_at        # offset of its rows in row_factor (batches * rows)
    Py_ssize_t col_at        # offset of its columns in col_factor (batches * cols)
    Py_ssize_t row_strip_at  # offset in row_sums (batches * rows * strips)
    Py_ssize_t block_col_at  # offset in col_sums (batches * row_blocks * cols)


cdef struct AfPlan:
    Py_ssize_t n_tensors
    Py_ssize_t n_tiles
    Py_ssize_t total
    Py_ssize_t tiles_per_claim  # tiles a thread takes at a time: CHUNK_ELEMENTS of the largest
    int n_parts
    int typenum
    AfTensor* tensors
    double* row_factor       # per row: the update's row factor, stored as the dtype
    double* col_factor       # per column: the column factor (as the dtype); before that, its column sum
    double* row_sums         # per (row, tile column): sum of g^2 over the tile's columns
    double* col_sums         # per (tile row, column): sum of g^2 over the tile's rows
    double* tile_p           # per tile: sum of p^2
    double* tile_u           # per tile: sum of u^2


cdef struct AfArgs:
    double weight            # of the new mean in the averages: step ** beta2_decay
    double eps1
    double inv_eps1          # 1 / eps1: the largest factor 1 / sqrt(variance) may reach
    double grad_scale        # negative for maximize
    double param_decay       # 1 - lr * weight_decay (update)
    const double* step_sizes # per tensor: -alpha / max(1, RMS(u) / d) (update)


cdef struct AfJob:
    const AfPlan* plan
    const AfArgs* args


cdef inline double lanes_tree(double* acc) noexcept nogil:
    """(0+1), (2+3)... pairwise, down to one: the order of the twin's lanes[0::2] + lanes[1::2]."""
    cdef Py_ssize_t width = AF_LANES // 2, j
    while width >= 1:
        for j in range(width):
            acc[j] = acc[2 * j] + acc[2 * j + 1]
        width //= 2
    return acc[0]


cdef inline double narrow_tree(double* values, Py_ssize_t n) noexcept nogil:
    """``lanes_tree`` of lanes of which only the first ``n`` (1 to AF_LANES) hold a
    value, given in ``values``: the others hold +0.0, and adding +0.0 to a sum of
    squares (never -0.0) changes no bit, so the pairs with a zero are skipped. A
    narrow row (a 3 x 3 convolution kernel) costs its elements, not 16 lanes."""
    cdef Py_ssize_t j, m = n
    while m > 1:
        for j in range(m // 2):
            values[j] = values[2 * j] + values[2 * j + 1]
        if m % 2:
            values[m // 2] = values[m - 1]
        m = (m + 1) // 2
    return values[0]


cdef inline floating capped(floating f, floating cap) noexcept nogil:
    """min(f, cap) that keeps a NaN f: 1/sqrt(max(v, eps1^2)) = min(1/sqrt(v), 1/eps1)."""
    return cap if cap < f else f


cdef inline void chunk_to_lanes(double* lanes, floating* chunk) noexcept nogil:
    """A chunk's lanes (in the dtype) added to the run's double lanes, then zeroed."""
    cdef Py_ssize_t l
    for l in range(AF_LANES):
        lanes[l] = lanes[l] + <double>chunk[l]
        chunk[l] = 0


cdef inline void square_run(const floating* p, const floating* g, Py_ssize_t n, floating scale,
                            floating* col, double* row_sum, double* p_sum) noexcept nogil:
    """One row of a tile (sweep A, factored): g^2 added to each column's sum; the
    row's sums of g^2 and of p^2 (lanes in the dtype per chunk, then in double)."""
    cdef double lg[AF_LANES]
    cdef double lp[AF_LANES]
    cdef floating cg[AF_LANES]
    cdef floating cp[AF_LANES]
    cdef floating d, s, x
    cdef Py_ssize_t c, q, l, i, at, m, full
    if n < AF_LANES:  # each lane holds one square (0 + s = s, exactly)
        lg[0] = lp[0] = 0.0  # a tile row has n >= 1; this tells the compiler so
        for l in range(n):
            d = scale * g[l]
            s = d * d
            col[l] = col[l] + s
            lg[l] = <double>s
            x = p[l]
            lp[l] = <double>(x * x)
        row_sum[0] = narrow_tree(lg, n)
        p_sum[0] = narrow_tree(lp, n)
        return
    for l in range(AF_LANES):
        lg[l] = lp[l] = 0.0
        cg[l] = cp[l] = 0
    for c in range((n + AF_CHUNK - 1) // AF_CHUNK):
        at = c * AF_CHUNK
        m = min(<Py_ssize_t>AF_CHUNK, n - at)
        full = m - m % AF_LANES
        for q in range(full // AF_LANES):
            prefetch_lanes(g, at + q * AF_LANES, n)
            prefetch_lanes(p, at + q * AF_LANES, n)
            for l in range(AF_LANES):
                i = at + q * AF_LANES + l
                d = scale * g[i]
                s = d * d
                col[i] = col[i] + s
                cg[l] = cg[l] + s
                x = p[i]
                cp[l] = cp[l] + x * x
        for l in range(m - full):
            i = at + full + l
            d = scale * g[i]
            s = d * d
            col[i] = col[i] + s
            cg[l] = cg[l] + s
            x = p[i]
            cp[l] = cp[l] + x * x
        chunk_to_lanes(lg, cg)
        chunk_to_lanes(lp, cp)
    row_sum[0] = lanes_tree(lg)
    p_sum[0] = lanes_tree(lp)


cdef inline double update_squares_run(const floating* g, const floating* col_factor, Py_ssize_t n,
                                      floating scale, floating row_factor, floating cap) noexcept nogil:
    """One row of a tile (sweep B): the sum of u^2, u = g * min(r_i c_j, 1/eps1)."""
    cdef double lu[AF_LANES]
    cdef floating cu[AF_LANES]
    cdef floating u
    cdef Py_ssize_t c, q, l, i, at, m, full
    if n < AF_LANES:  # each lane holds one square
        lu[0] = 0.0
        for l in range(n):
            u = (scale * g[l]) * capped(row_factor * col_factor[l], cap)
            lu[l] = <double>(u * u)
        return narrow_tree(lu, n)
    for l in range(AF_LANES):
        lu[l] = 0.0
        cu[l] = 0
    for c in range((n + AF_CHUNK - 1) // AF_CHUNK):
        at = c * AF_CHUNK
        m = min(<Py_ssize_t>AF_CHUNK, n - at)
        full = m - m % AF_LANES
        prefetch_chunk(g, at, m, n)
        for q in range(full // AF_LANES):
            for l in range(AF_LANES):
                i = at + q * AF_LANES + l
                u = (scale * g[i]) * capped(row_factor * col_factor[i], cap)
                cu[l] = cu[l] + u * u
        for l in range(m - full):
            i = at + full + l
            u = (scale * g[i]) * capped(row_factor * col_factor[i], cap)
            cu[l] = cu[l] + u * u
        chunk_to_lanes(lu, cu)
    return lanes_tree(lu)


cdef inline void variance_run(const floating* p, const floating* g, floating* v, Py_ssize_t n,
                              const AfArgs* a, double* p_sum, double* u_sum) noexcept nogil:
    """A run of an unfactored tensor (sweep A): variance = lerp(variance, d^2, weight),
    then the sums of p^2 and of u^2, u = d * min(1/sqrt(variance), 1/eps1)."""
    cdef double lp[AF_LANES]
    cdef double lu[AF_LANES]
    cdef floating cp[AF_LANES]
    cdef floating cu[AF_LANES]
    cdef floating scale = <floating>a.grad_scale, cap = <floating>a.inv_eps1, one = 1
    cdef floating w = <floating>a.weight, w_rest = <floating>(1.0 - a.weight)
    cdef bint from_end = not (a.weight < 0.5)
    cdef floating d, average, u, x
    cdef Py_ssize_t c, q, l, i, at, m, full
    for l in range(AF_LANES):
        lp[l] = lu[l] = 0.0
        cp[l] = cu[l] = 0
    for c in range((n + AF_CHUNK - 1) // AF_CHUNK):
        at = c * AF_CHUNK
        m = min(<Py_ssize_t>AF_CHUNK, n - at)
        full = m - m % AF_LANES
        for q in range(full // AF_LANES):
            for l in range(AF_LANES):
                i = at + q * AF_LANES + l
                d = scale * g[i]
                average = lerp(v[i], d * d, w, w_rest, from_end)
                v[i] = average
                u = d * capped(one / root(average), cap)
                cu[l] = cu[l] + u * u
                x = p[i]
                cp[l] = cp[l] + x * x
        for l in range(m - full):
            i = at + full + l
            d = scale * g[i]
            average = lerp(v[i], d * d, w, w_rest, from_end)
            v[i] = average
            u = d * capped(one / root(average), cap)
            cu[l] = cu[l] + u * u
            x = p[i]
            cp[l] = cp[l] + x * x
        chunk_to_lanes(lp, cp)
        chunk_to_lanes(lu, cu)
    p_sum[0] = lanes_tree(lp)
    u_sum[0] = lanes_tree(lu)


cdef inline void factored_update_run(floating* p, const floating* g, const floating* col_factor,
                                     Py_ssize_t n, floating scale, floating row_factor, floating cap,
                                     floating decay, floating step_size) noexcept nogil:
    cdef floating u
    cdef Py_ssize_t j
    for j in range(n):
        u = (scale * g[j]) * capped(row_factor * col_factor[j], cap)
        p[j] = p[j] * decay + step_size * u


cdef inline void variance_update_run(floating* p, const floating* g, const floating* v, Py_ssize_t n,
                                     floating scale, floating cap, floating decay,
                                     floating step_size) noexcept nogil:
    cdef floating u, one = 1
    cdef Py_ssize_t j
    for j in range(n):
        u = (scale * g[j]) * capped(one / root(v[j]), cap)
        p[j] = p[j] * decay + step_size * u


# ------------------------------------------------------------------ tiles
cdef inline Py_ssize_t tensor_of_tile(const AfPlan* plan, Py_ssize_t tile) noexcept nogil:
    """The tensor of ``tile``: the last whose first tile is at or before it (an empty
    tensor has no tile, and the next tensor starts where it would have)."""
    cdef Py_ssize_t lo = 0, hi = plan.n_tensors, mid
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if plan.tensors[mid].first_tile <= tile:
            lo = mid
        else:
            hi = mid
    return lo


cdef inline void tile_place(const AfTensor* T, Py_ssize_t local, Py_ssize_t* b, Py_ssize_t* i0,
                            Py_ssize_t* i1, Py_ssize_t* j0, Py_ssize_t* width) noexcept nogil:
    """Tile number ``local`` of T (tile order: matrix, row block, column strip)."""
    cdef Py_ssize_t strip = local % T.strips, block = (local // T.strips) % T.row_blocks
    b[0] = local // (T.strips * T.row_blocks)
    i0[0] = block * AF_ROW_BLOCK
    i1[0] = min(i0[0] + AF_ROW_BLOCK, T.rows)
    j0[0] = strip * T.width
    width[0] = min(T.width, T.cols - j0[0])


cdef inline void statistics_tile(const AfPlan* plan, const AfArgs* a, Py_ssize_t tile,
                                 floating kind) noexcept nogil:
    cdef Py_ssize_t t = tensor_of_tile(plan, tile)
    cdef const AfTensor* T = &plan.tensors[t]
    cdef Py_ssize_t local = tile - T.first_tile, b, i0, i1, j0, width, i, j, at, strip
    cdef const floating* p = <const floating*>T.p
    cdef const floating* g = <const floating*>T.g
    cdef floating scale = <floating>a.grad_scale
    cdef double col_bytes[AF_STRIP_DOUBLES]  # the tile's column sums, in the dtype
    cdef floating* col = <floating*>col_bytes
    cdef double* sums
    cdef double total = 0.0, row_sum, p_sum
    tile_place(T, local, &b, &i0, &i1, &j0, &width)
    if T.variance != NULL:
        variance_run(p + j0, g + j0, <floating*>T.variance + j0, width, a,
                     &plan.tile_p[tile], &plan.tile_u[tile])
        return
    strip = local % T.strips
    for j in range(width):
        col[j] = 0
    for i in range(i0, i1):
        at = (b * T.rows + i) * T.cols + j0
        square_run(p + at, g + at, width, scale, col, &row_sum, &p_sum)
        plan.row_sums[T.row_strip_at + (b * T.rows + i) * T.strips + strip] = row_sum
        total = total + p_sum
    plan.tile_p[tile] = total
    sums = plan.col_sums + T.block_col_at + (b * T.row_blocks + i0 // AF_ROW_BLOCK) * T.cols + j0
    for j in range(width):
        sums[j] = <double>col[j]


cdef inline void update_squares_tile(const AfPlan* plan, const AfArgs* a, Py_ssize_t tile,
                                     floating kind) noexcept nogil:
    cdef Py_ssize_t t = tensor_of_tile(plan, tile)
    cdef const AfTensor* T = &plan.tensors[t]
    cdef Py_ssize_t b, i0, i1, j0, width, i, at
    cdef floating scale = <floating>a.grad_scale, cap = <floating>a.inv_eps1
    cdef const floating* row_factor = <const floating*>plan.row_factor + T.row_at
    cdef const floating* col_factor
    cdef double total = 0.0
    if T.variance != NULL:  # summed in sweep A
        return
    tile_place(T, tile - T.first_tile, &b, &i0, &i1, &j0, &width)
    col_factor = <const floating*>plan.col_factor + T.col_at + b * T.cols + j0
    for i in range(i0, i1):
        at = (b * T.rows + i) * T.cols + j0
        total = total + update_squares_run(<const floating*>T.g + at, col_factor, width, scale,
                                           row_factor[b * T.rows + i], cap)
    plan.tile_u[tile] = total


cdef inline void update_tile(const AfPlan* plan, const AfArgs* a, Py_ssize_t tile,
                             floating kind) noexcept nogil:
    cdef Py_ssize_t t = tensor_of_tile(plan, tile)
    cdef const AfTensor* T = &plan.tensors[t]
    cdef Py_ssize_t b, i0, i1, j0, width, i, at
    cdef floating scale = <floating>a.grad_scale, cap = <floating>a.inv_eps1
    cdef floating decay = <floating>a.param_decay, step_size = <floating>a.step_sizes[t]
    cdef const floating* row_factor = <const floating*>plan.row_factor + T.row_at
    cdef const floating* col_factor
    tile_place(T, tile - T.first_tile, &b, &i0, &i1, &j0, &width)
    if T.variance != NULL:
        variance_update_run(<floating*>T.p + j0, <const floating*>T.g + j0, <const floating*>T.variance + j0,
                            width, scale, cap, decay, step_size)
        return
    col_factor = <const floating*>plan.col_factor + T.col_at + b * T.cols + j0
    for i in range(i0, i1):
        at = (b * T.rows + i) * T.cols + j0
        factored_update_run(<floating*>T.p + at, <const floating*>T.g + at, col_factor, width, scale,
                            row_factor[b * T.rows + i], cap, decay, step_size)


cdef void statistics_range_f32(const void* ctx, Py_ssize_t begin, Py_ssize_t end) noexcept nogil:
    cdef const AfJob* job = <const AfJob*>ctx
    cdef Py_ssize_t tile
    for tile in range(begin, end):
        statistics_tile(job.plan, job.args, tile, <float>0)


cdef void statistics_range_f64(const void* ctx, Py_ssize_t begin, Py_ssize_t end) noexcept nogil:
    cdef const AfJob* job = <const AfJob*>ctx
    cdef Py_ssize_t tile
    for tile in range(begin, end):
        statistics_tile(job.plan, job.args, tile, <double>0)


cdef void update_squares_range_f32(const void* ctx, Py_ssize_t begin, Py_ssize_t end) noexcept nogil:
    cdef const AfJob* job = <const AfJob*>ctx
    cdef Py_ssize_t tile
    for tile in range(begin, end):
        update_squares_tile(job.plan, job.args, tile, <float>0)


cdef void update_squares_range_f64(const void* ctx, Py_ssize_t begin, Py_ssize_t end) noexcept nogil:
    cdef const AfJob* job = <const AfJob*>ctx
    cdef Py_ssize_t tile
    for tile in range(begin, end):
        update_squares_tile(job.plan, job.args, tile, <double>0)


cdef void update_range_f32(const void* ctx, Py_ssize_t begin, Py_ssize_t end) noexcept nogil:
    cdef const AfJob* job = <const AfJob*>ctx
    cdef Py_ssize_t tile
    for tile in range(begin, end):
        update_tile(job.plan, job.args, tile, <float>0)


cdef void update_range_f64(const void* ctx, Py_ssize_t begin, Py_ssize_t end) noexcept nogil:
    cdef const AfJob* job = <const AfJob*>ctx
    cdef Py_ssize_t tile
    for tile in range(begin, end):
        update_tile(job.plan, job.args, tile, <double>0)


# --------------------------------------------- between the sweeps (caller)
cdef inline void average_factors(const AfPlan* plan, const AfArgs* a, floating kind) noexcept nogil:
    """For each factored tensor: row_var and col_var move toward the means of g^2
    along the rows and the columns (lerp by ``weight``)."""
    cdef floating w = <floating>a.weight, w_rest = <floating>(1.0 - a.weight)
    cdef bint from_end = not (a.weight < 0.5)
    cdef const AfTensor* T
    cdef floating* rv
    cdef floating* cv
    cdef double* col
    cdef double s
    cdef Py_ssize_t t, b, i, j, k, block
    for t in range(plan.n_tensors):
        T = &plan.tensors[t]
        if T.variance != NULL or T.n_tiles == 0:
            continue
        rv = <floating*>T.row_var
        cv = <floating*>T.col_var
        for b in range(T.batches):
            for i in range(T.rows):
                s = 0.0
                for k in range(T.strips):
                    s = s + plan.row_sums[T.row_strip_at + (b * T.rows + i) * T.strips + k]
                rv[b * T.rows + i] = lerp(rv[b * T.rows + i], <floating>(s / T.cols), w, w_rest, from_end)
            col = plan.col_factor + T.col_at + b * T.cols  # the column sums, for now
            for j in range(T.cols):
                col[j] = 0.0
            for block in range(T.row_blocks):
                for j in range(T.cols):
                    col[j] = col[j] + plan.col_sums[T.block_col_at + (b * T.row_blocks + block) * T.cols + j]
            for j in range(T.cols):
                cv[b * T.cols + j] = lerp(cv[b * T.cols + j], <floating>(col[j] / T.rows), w, w_rest, from_end)


cdef inline void compute_factors(const AfPlan* plan, const AfArgs* a, floating kind) noexcept nogil:
    """Each row's and column's factor of the update of each factored tensor:
    r_i = 1/sqrt(row_var_i / max(mean(row_var), eps1)), c_j = 1/sqrt(col_var_j),
    computed in double and rounded to the dtype, so that 1/sqrt(v_ij) = r_i c_j."""
    cdef floating eps1 = <floating>a.eps1, mean
    cdef const AfTensor* T
    cdef const floating* rv
    cdef const floating* cv
    cdef floating* row_factor
    cdef floating* col_factor
    cdef double s
    cdef Py_ssize_t t, b, i, j
    for t in range(plan.n_tensors):
        T = &plan.tensors[t]
        if T.variance != NULL or T.n_tiles == 0:
            continue
        rv = <const floating*>T.row_var
        cv = <const floating*>T.col_var
        row_factor = <floating*>plan.row_factor + T.row_at
        col_factor = <floating*>plan.col_factor + T.col_at
        for b in range(T.batches):
            s = 0.0
            for i in range(T.rows):
                s = s + <double>rv[b * T.rows + i]
            mean = <floating>(s / T.rows)
            mean = eps1 if eps1 > mean else mean  # clamp_(min=eps1), NaN kept
            for i in range(T.rows):
                row_factor[b * T.rows + i] = <floating>(1.0 / sqrt(<double>rv[b * T.rows + i] / <double>mean))
        for j in range(T.batches * T.cols):
            col_factor[j] = <floating>(1.0 / sqrt(<double>cv[j]))


# ---------------------------------------------------------------- the plan
cdef Py_ssize_t af_blocks(Py_ssize_t n, Py_ssize_t size) noexcept nogil:
    return (n + size - 1) // size


cdef Py_ssize_t af_strip_width(Py_ssize_t cols, Py_ssize_t itemsize) noexcept nogil:
    """Columns per strip of a matrix of ``cols`` columns: whole rows up to
    AF_STRIP_BYTES (the rows of a tile are then one run of memory), else the fewest
    strips of at most that, of equal widths rounded up to a multiple of AF_CHUNK."""
    cdef Py_ssize_t strips = max(<Py_ssize_t>1, af_blocks(cols, AF_STRIP_BYTES // itemsize))
    return max(<Py_ssize_t>1, af_blocks(af_blocks(cols, strips), AF_CHUNK)) * AF_CHUNK


cdef int af_plan_init(AfPlan* plan, list params, list grads, list row_var, list col_var, list variance,
                      int n_threads, bint reductions) except -1:
    """Gather every tensor's arrays and geometry, and allocate the scratch sums.

    The face validates everything first; these are the cheap checks that keep a
    direct call of the private kernel inside its arrays. On error the caller still
    owns what was allocated: call ``af_plan_free``."""
    cdef Py_ssize_t t, n, rows, cols, d
    cdef Py_ssize_t n_rows = 0, n_cols = 0, n_row_strips = 0, n_block_cols = 0, largest_tile = 1
    cdef cnp.ndarray p, g, rv, cv, v
    cdef AfTensor* T
    plan.n_tensors = len(params)
    plan.tensors = NULL
    for role in (grads, row_var, col_var, variance):
        if len(<list>role) != plan.n_tensors:
            raise ValueError(f"{len(<list>role)} arrays for {plan.n_tensors} parameters: every role needs one "
                             "entry per parameter")
    if n_threads < 1:
        raise ValueError(f"n_threads must be at least 1, got {n_threads}")
    plan.tensors = <AfTensor*>malloc((plan.n_tensors + 1) * sizeof(AfTensor))
    if plan.tensors == NULL:
        raise MemoryError()
    plan.typenum = cnp.NPY_FLOAT32
    plan.n_tiles = 0
    plan.total = 0
    for t in range(plan.n_tensors):
        p = <cnp.ndarray?>params[t]
        g = <cnp.ndarray?>grads[t]
        if t == 0:
            plan.typenum = cnp.PyArray_TYPE(p)
            if plan.typenum != cnp.NPY_FLOAT32 and plan.typenum != cnp.NPY_FLOAT64:
                raise TypeError("kernels take float32 or float64 buffers")
        n = cnp.PyArray_SIZE(p)
        for a in (p, g):
            if cnp.PyArray_TYPE(<cnp.ndarray>a) != plan.typenum or not cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>a):
                raise ValueError("kernel buffers must be contiguous and of one dtype")
        if cnp.PyArray_SIZE(g) != n:
            raise ValueError("a gradient differs in size from its parameter")
        T = &plan.tensors[t]
        T.p = cnp.PyArray_DATA(p)
        T.g = cnp.PyArray_DATA(g)
        T.row_var = T.col_var = T.variance = NULL
        if row_var[t] is not None:
            rv = <cnp.ndarray?>row_var[t]
            cv = <cnp.ndarray?>col_var[t]
            if variance[t] is not None:
                raise ValueError("a factored parameter keeps no variance")
            d = cnp.PyArray_NDIM(rv)
            if (d < 2 or cnp.PyArray_NDIM(cv) != d or rv.shape[d - 1] != 1 or cv.shape[d - 2] != 1
                    or (<object>rv).shape[:d - 2] != (<object>cv).shape[:d - 2]):
                raise ValueError("row_var and col_var must be shaped (..., rows, 1) and (..., 1, cols)")
            rows, cols = rv.shape[d - 2], cv.shape[d - 1]
            T.batches = cnp.PyArray_SIZE(cv) // cols if cols else cnp.PyArray_SIZE(rv) // rows if rows else 0
            if T.batches * rows * cols != n:
                raise ValueError("row_var and col_var do not fit their parameter's size")
            for a in (rv, cv):
                if cnp.PyArray_TYPE(<cnp.ndarray>a) != plan.typenum or not cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>a):
                    raise ValueError("kernel buffers must be contiguous and of one dtype")
            T.row_var = cnp.PyArray_DATA(rv)
            T.col_var = cnp.PyArray_DATA(cv)
        else:
            if col_var[t] is not None or variance[t] is None:
                raise ValueError("a parameter keeps either row_var and col_var, or variance")
            v = <cnp.ndarray?>variance[t]
            if (cnp.PyArray_TYPE(v) != plan.typenum or not cnp.PyArray_IS_C_CONTIGUOUS(v)
                    or cnp.PyArray_SIZE(v) != n):
                raise ValueError("variance must be contiguous, of its parameter's dtype and size")
            T.variance = cnp.PyArray_DATA(v)
            T.batches, rows, cols = 1, 1, n
        T.rows, T.cols = rows, cols
        T.row_blocks = af_blocks(rows, AF_ROW_BLOCK)
        T.width = af_strip_width(cols, cnp.PyArray_ITEMSIZE(p))
        T.strips = af_blocks(cols, T.width)
        T.n_tiles = T.batches * T.row_blocks * T.strips if n else 0
        if n:
            largest_tile = max(largest_tile, min(rows, <Py_ssize_t>AF_ROW_BLOCK) * min(cols, T.width))
        T.first_tile = plan.n_tiles
        plan.n_tiles += T.n_tiles
        plan.total += n
        T.row_at = T.col_at = T.row_strip_at = T.block_col_at = 0
        if T.variance == NULL and n:
            T.row_at, T.col_at = n_rows, n_cols
            T.row_strip_at, T.block_col_at = n_row_strips, n_block_cols
            n_rows += T.batches * rows
            n_cols += T.batches * cols
            n_row_strips += T.batches * rows * T.strips
            n_block_cols += T.batches * T.row_blocks * cols
    plan.n_parts = choose_parts(plan.total, n_threads)
    plan.tiles_per_claim = chunk_items(largest_tile)
    # Doubles everywhere: a factor (a float or a double) fits in one.
    plan.row_factor = <double*>malloc((n_rows + 1) * sizeof(double))
    plan.col_factor = <double*>malloc((n_cols + 1) * sizeof(double))
    if plan.row_factor == NULL or plan.col_factor == NULL:
        raise MemoryError()
    if reductions:
        plan.row_sums = <double*>malloc((n_row_strips + 1) * sizeof(double))
        plan.col_sums = <double*>malloc((n_block_cols + 1) * sizeof(double))
        plan.tile_p = <double*>malloc((plan.n_tiles + 1) * sizeof(double))
        plan.tile_u = <double*>malloc((plan.n_tiles + 1) * sizeof(double))
        if plan.row_sums == NULL or plan.col_sums == NULL or plan.tile_p == NULL or plan.tile_u == NULL:
            raise MemoryError()
    return 0


cdef void af_plan_free(AfPlan* plan) noexcept:
    free(plan.tensors)
    free(plan.row_factor)
    free(plan.col_factor)
    free(plan.row_sums)
    free(plan.col_sums)
    free(plan.tile_p)
    free(plan.tile_u)


cdef void af_plan_clear(AfPlan* plan) noexcept:
    plan.tensors = NULL
    plan.row_factor = plan.col_factor = plan.row_sums = plan.col_sums = NULL
    plan.tile_p = plan.tile_u = NULL


cdef void af_args(AfArgs* a, double eps1, double grad_scale) noexcept:
    a.eps1 = eps1
    a.inv_eps1 = 1.0 / eps1 if eps1 > 0.0 else INFINITY
    a.grad_scale = grad_scale
    a.weight = 1.0
    a.param_decay = 1.0
    a.step_sizes = NULL


def adafactor_statistics(list params not None, list grads not None, list row_var not None,
                         list col_var not None, list variance not None, *, double weight, double eps1,
                         double grad_scale, int n_threads):
    """Adafactor's reductions over many tensors (private: call ``fastdescent.adafactor_step``).

    Each buffer list has one entry per tensor: ``row_var`` and ``col_var`` (shaped
    ``(..., rows, 1)`` and ``(..., 1, cols)``) for a factored tensor, else None
    there and ``variance`` (its parameter's size). Moves the second-moment state
    toward this step's mean squares of ``grad_scale * g`` by ``weight``, in place,
    and returns a float64 array of shape ``(len(params), 2)``: per tensor the sum
    of the squares of the parameter and of the update
    ``u = grad_scale * g * min(1/sqrt(v), 1/eps1)`` (``v`` the factored or full
    second moment). An empty tensor is left alone and sums to zero.
    """
    cdef AfPlan plan
    cdef AfArgs a
    cdef AfJob job
    cdef Py_ssize_t t, k
    cdef cnp.ndarray out = np.zeros((len(params), 2))
    cdef double* sums = <double*>cnp.PyArray_DATA(out)
    cdef double sp, su
    af_plan_clear(&plan)
    af_args(&a, eps1, grad_scale)
    a.weight = weight
    job.plan = &plan
    job.args = &a
    try:
        af_plan_init(&plan, params, grads, row_var, col_var, variance, n_threads, True)
        with nogil:
            if plan.typenum == cnp.NPY_FLOAT32:
                fd_pool_run(plan.n_parts, plan.n_tiles, 1, plan.tiles_per_claim, statistics_range_f32, &job)
                average_factors(&plan, &a, <float>0)
                compute_factors(&plan, &a, <float>0)
                fd_pool_run(plan.n_parts, plan.n_tiles, 1, plan.tiles_per_claim, update_squares_range_f32, &job)
            else:
                fd_pool_run(plan.n_parts, plan.n_tiles, 1, plan.tiles_per_claim, statistics_range_f64, &job)
                average_factors(&plan, &a, <double>0)
                compute_factors(&plan, &a, <double>0)
                fd_pool_run(plan.n_parts, plan.n_tiles, 1, plan.tiles_per_claim, update_squares_range_f64, &job)
            call_finished()
            for t in range(plan.n_tensors):
                sp = 0.0
                su = 0.0
                for k in range(plan.tensors[t].first_tile, plan.tensors[t].first_tile + plan.tensors[t].n_tiles):
                    sp = sp + plan.tile_p[k]
                    su = su + plan.tile_u[k]
                sums[2 * t] = sp
                sums[2 * t + 1] = su
    finally:
        af_plan_free(&plan)
    return out


def adafactor_update(list params not None, list grads not None, list row_var not None,
                     list col_var not None, list variance not None, *, step_sizes, double param_decay,
                     double eps1, double grad_scale, int n_threads):
    """Adafactor's fused update over many tensors (private: call ``fastdescent.adafactor_step``).

    ``p = p * param_decay + step_sizes[t] * u`` for every element of tensor ``t``,
    ``u = grad_scale * g * min(1/sqrt(v), 1/eps1)``, reading a factored second
    moment through the factors of its rows and columns (as ``adafactor_statistics``
    computes them, from ``row_var`` and ``col_var`` after its averaging).
    ``step_sizes``: a float64 array, one per tensor.
    """
    cdef AfPlan plan
    cdef AfArgs a
    cdef AfJob job
    cdef cnp.ndarray sizes = np.ascontiguousarray(step_sizes, dtype=np.float64)
    if sizes.ndim != 1 or sizes.shape[0] != len(params):
        raise ValueError(f"step_sizes must hold one float per parameter ({len(params)})")
    af_plan_clear(&plan)
    af_args(&a, eps1, grad_scale)
    a.param_decay = param_decay
    a.step_sizes = <const double*>cnp.PyArray_DATA(sizes)
    job.plan = &plan
    job.args = &a
    try:
        af_plan_init(&plan, params, grads, row_var, col_var, variance, n_threads, False)
        with nogil:
            if plan.typenum == cnp.NPY_FLOAT32:
                compute_factors(&plan, &a, <float>0)
                fd_pool_run(plan.n_parts, plan.n_tiles, 1, plan.tiles_per_claim, update_range_f32, &job)
            else:
                compute_factors(&plan, &a, <double>0)
                fd_pool_run(plan.n_parts, plan.n_tiles, 1, plan.tiles_per_claim, update_range_f64, &job)
            call_finished()
    finally:
        af_plan_free(&plan)
