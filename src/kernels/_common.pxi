# Shared plumbing for every update-rule kernel: how a multi-tensor call is split
# among threads, and how each piece reaches a rule's element loop.
#
# A call updates T tensors, each with R buffers of equal length (the roles: param,
# grad, and the rule's state). The T lengths are concatenated into one index space
# [0, total) and cut into n_parts nearly equal, contiguous parts, one per thread.
# A part may cover the tail of one tensor, many small tensors and the head of
# another: small arrays are grouped and large ones split, so the threads share the
# work evenly whatever the sizes. A rule supplies only a *segment function*: the
# element loop over one contiguous run of one tensor.
#
# Every rule is elementwise, so the result does not depend on how the index space
# is cut, nor on which thread runs which piece: any thread count, and any timing
# of the threads, gives bit-identical results.
#
# Threads: a small pool of our own, not an OpenMP region
# -------------------------------------------------------
# An OpenMP region ends with a barrier: the caller returns only when every thread
# of the team has woken up, run its share and arrived. A worker that went to sleep
# between two optimizer steps (libgomp parks it after about 3 ms of spinning on
# this machine) takes tens of microseconds to wake up, more when another process
# holds its core, and the caller waits for it. That made 2 threads slower than 1
# up to about 10^6 elements in a training loop, so a "warm team" rule kept
# mid-sized updates serial, and back-to-back mid-sized calls, never entering a
# region, never warmed the team up (issue 20).
#
# The pool below removes the wait instead of guessing when it is short:
#
# * Work stealing in fixed chunks. Part k is owned by thread k (the caller owns
#   part 0) and is taken CHUNK elements at a time from its front; a thread that
#   has finished its own part takes chunks from the back of the others' parts.
#   The caller starts on its part at once. A worker still waking up finds its part
#   partly or wholly done by the caller, and the caller never waits for a thread
#   that has not started: it waits at most for chunks already being run. In the
#   steady state each thread runs exactly its own part, the same elements every
#   call, so data that fits in a core's L2 cache stays there (a dynamic schedule
#   would move it between cores on every call).
# * Alternating order (fd_job_reversed). A call on the same arrays as the calling
#   thread's previous one runs the other way: each owner takes its chunks from the
#   back if it took them from the front last time, and thieves from the other end.
#   Each thread then starts on the chunks still in its L2 cache. Swept the same
#   way every time, a part a little larger than the cache would find none of it
#   there. Calls that run alone alternate the same way, chunk by chunk.
# * Spin, then park. After a job a worker spins for SPIN seconds (1 ms by
#   default; 0 with OMP_WAIT_POLICY=passive, forever with =active), then sleeps
#   on a condition variable; at once if the spin was descheduled (other threads
#   want the cores: spinning would take one from them or from our caller), and
#   then back-to-back calls do not wake it for a while (it would not stay awake;
#   not after a long spin, below, which another thread's work took over): 20
#   times as long as it was without its core, 2 ms to 100 ms (fd_backoff_window).
#   A spinning worker calls sched_yield every 50 us, so that a thread waiting for
#   its core gets it at once (and the worker, finding it lost its core, parks).
#   A job costs the caller one atomic increment while the workers spin. While
#   they sleep it costs a futex wake-up (a system call: a few microseconds), and
#   the time they take to be scheduled (tens of microseconds; more in a VM whose
#   other vCPU halted, a time slice on a busy machine), during which the caller
#   runs alone. Stealing means the caller never waits for a late worker, but the
#   work saved must exceed that cost.
# * The policy measures that cost rather than guessing it. Every worker that slept
#   times its wake-up (from the waker's call to its running), every waker times
#   its call, and every update that ran alone or on awake workers gives one
#   thread's rate (elements per second): running estimates. Parked workers are
#   woken for an update when, by those, the caller working alone until they
#   arrive, then sharing the rest, and waiting at most one chunk at the end,
#   still comes to at most 90% of the update alone (fd_wake_pays).
# * The pool knows until when each worker will spin, so the policy needs no clock
#   to tell awake workers from parked ones (a worker about to park counts as
#   parked). A clock only tells back-to-back calls: if the previous call ended
#   less than SPIN/2 ago, sleeping workers are woken even for a mid-sized update,
#   since they will still be spinning for the next one. (Not up to SPIN: calls
#   SPIN apart would wake them for nothing every time.)
# * Spin longer after large updates (fd_spin_after_job). In a training loop the
#   gap between two steps changes little. After a job whose update takes T on one
#   thread, the workers spin up to 16 T (50 ms at most) if the gap before this job
#   was that short: the next step then finds them awake instead of paying a
#   wake-up, a millisecond on a VM whose other vCPU halted, during which torch's
#   still-spinning OpenMP team is already working. Libgomp spins a fixed ~300,000
#   iterations (GOMP_SPINCOUNT; milliseconds), OpenBLAS 2^28 cycles (~0.1 s, with
#   sched_yield), whatever the size of the work; here the spin grows with the
#   work it can save, and is not spent when the last gap says it would not be
#   caught. Not under OMP_WAIT_POLICY=passive, nor for a while after a long
#   spin was cut short (fd_long_spin_cut: 10 ms, doubling with each cut in a row).
# * A hint (prepare_threads, fd_pool_prepare): an optimizer about to validate and
#   run a step of N elements says so first. Spinning workers then keep spinning
#   for it, and parked ones are woken at once, so that their wake-up latency
#   overlaps the caller's own work before the kernel call.
# * One caller at a time: a second Python thread finding the pool busy runs its
#   update alone, correctly, rather than waiting.
# * Back-off: the caller must wait for chunks already being run. If a worker lost
#   its core mid-chunk (more runnable threads than cores), that wait is a time
#   slice, milliseconds. Updates run alone for a while (fd_backoff_window: 20 times
#   what the job lost against the update alone, or how long a thread was without
#   its core, 2 ms to 100 ms) when no spinning
#   worker came while the caller ran its own part (one in a long spin that did not
#   come only stops long spins for a while), or when the job took longer than the update
#   alone would have (by the rate estimate) and the wait was long against the job
#   or the caller itself lost its core for a fifth of a job that woke a worker or
#   was long (it then reads its CPU time, a system call). A job that beat the
#   serial time paid for its threads even if a core was taken from it for a while
#   (a VM's host preempting a vCPU), and does not make the next ones serial.
#   pool_state() counts the back-offs by reason.
# * Fork: a child has none of its parent's threads. A pthread_atfork handler
#   empties the pool in the child, which starts fresh workers when it needs them.
#
# Thread counts still come from OpenMP (fastdescent._config reads
# omp_get_max_threads per call, which threadpoolctl and OMP_NUM_THREADS set), and
# workers are allowed every CPU of the OpenMP places when OMP_PROC_BIND pinned
# the importing thread. Each kernel variant module has its own pool; only the
# dispatched one starts threads in normal use.

cimport numpy as cnp
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from libc.stdlib cimport malloc, free
from libc.math cimport INFINITY

cnp.import_array()

cdef extern from *:
    """
    #include <pthread.h>
    #include <signal.h>
    #include <stdint.h>
    #include <sched.h>
    #include <time.h>
    #ifdef _OPENMP
    #include <omp.h>
    #else
    static int omp_get_num_places(void) { return 0; }
    static int omp_get_place_num_procs(int p) { (void)p; return 0; }
    static void omp_get_place_proc_ids(int p, int *ids) { (void)p; (void)ids; }
    #endif

    #if defined(__x86_64__) || defined(__i386__)
    #define fd_cpu_relax() __builtin_ia32_pause()
    #elif defined(__aarch64__)
    #define fd_cpu_relax() __asm__ __volatile__("yield")
    #else
    #define fd_cpu_relax() ((void)0)
    #endif

    #define FD_MAX_THREADS 64
    /* Estimates before anything was measured: a slow wake-up (a VM's halted vCPU)
       and a fast, in-cache update, so that nothing mid-sized wakes a sleeping
       worker until the machine has shown it pays. */
    #define FD_FIRST_WAKE_LATENCY 1e-4
    #define FD_FIRST_WAKE_COST 5e-6
    #define FD_FIRST_RATE 1.5e9
    /* A wake-up sample counts for at most this (a worker that waited for a time
       slice): enough to stop waking for anything mid-sized. */
    #define FD_MAX_WAKE_SAMPLE 2e-3
    /* With no wake-up measured for this long, the policy tries the first estimate
       again (a measure taken under a passing load must not keep it serial for
       ever): at most one wake-up a second that may not pay. */
    #define FD_WAKE_SAMPLE_MAX_AGE 1.0
    /* After a job, workers spin up to this many times the job's serial time (the
       update's elements over one thread's rate), at most FD_MAX_SPIN: see
       fd_spin_after_job. */
    #define FD_SPIN_PER_WORK 16.0
    #define FD_MAX_SPIN 0.05
    /* A spinning worker offers its core to other runnable threads this often. */
    #define FD_SPIN_YIELD_EVERY 5e-5
    #define FD_GATE_OPEN 0x80000000u
    /* A back-off lasts this many times the time it answers (what a job lost against
       the update alone, or how long a thread was without its core), within these
       bounds: see fd_backoff_window. */
    #define FD_BACKOFF_PER_LOSS 20.0
    #define FD_MIN_BACKOFF 2e-3
    #define FD_MAX_BACKOFF 0.1
    /* Reasons to back off, counted in fd_pool.backoff_why. */
    enum {FD_WHY_SPIN_DESCHEDULED, FD_WHY_NO_WORKER_JOINED, FD_WHY_WOKEN_WORKER_LATE,
          FD_WHY_LAST_CHUNK_WAIT, FD_WHY_CALLER_DESCHEDULED, FD_N_WHY};

    typedef void (*fd_range_fn)(const void *ctx, Py_ssize_t begin, Py_ssize_t end);

    /* Chunks of part k not yet taken: [front, back), packed in one word so that
       the owner (front) and thieves (back) claim with one compare-and-swap. */
    typedef struct { uint64_t claim; char pad[56]; } fd_part;

    static struct {
        pthread_mutex_t lock;
        pthread_cond_t wake;
        int n_workers;              /* started (the caller is not one) */
        int busy;                   /* a caller owns the pool */
        unsigned long generation;   /* bumped once per job */
        int sleepers;               /* workers parked on `wake` */
        int joined;                 /* a worker joined the current job */
        unsigned int gate;          /* FD_GATE_OPEN while workers may join, | number inside */
        double spin_seconds;
        int backoff;                /* back off under overload (on unless an experiment) */
        double contended_until;     /* serial until then: a worker was preempted */
        double no_burst_until;      /* no back-to-back wake-ups until then */
        double no_long_spin_until;  /* no spins past spin_seconds until then */
        int long_spin_cuts;         /* long spins cut short in a row (fd_long_spin_cut) */
        double job_ended;           /* when the last job ended */
        unsigned long long_spins;   /* jobs after which the workers spun longer */
        unsigned long backoffs;
        /* Why the pool backed off (FD_WHY_*): for pool_state and experiments. */
        unsigned long backoff_why[FD_N_WHY];
        unsigned long jobs, wakeups;  /* parallel jobs run; of them, jobs that woke workers */
        unsigned long hints;        /* wake-up hints that woke workers or kept them spinning */
        /* Running estimates (relaxed atomic doubles) for the cold policy, measured on
           every wake-up and every update of at least a chunk: */
        double wake_latency;        /* seconds from a wake-up call to the worker running */
        double wake_cost;           /* seconds the waking thread spends in that call */
        double rate;                /* elements per second one thread updates */
        double woken_at;            /* when workers were last woken */
        double sampled_at;          /* when a worker last measured its wake-up */
        double keep_spinning_until; /* a hint: idle workers spin at least until then */
        unsigned long forks_seen;
        /* The job: written by the caller while no worker is inside. */
        fd_range_fn fn;
        const void *ctx;
        Py_ssize_t n_items, align, chunk;
        int n_parts;
        int reverse;                /* owners take their chunks from the back (fd_job_reversed) */
        int serpentine;             /* alternate directions (on unless an experiment) */
        unsigned long reversed;     /* jobs run back to front, alone or not */
    } fd_pool = {.lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER,
                 .spin_seconds = 1e-3, .backoff = 1, .serpentine = 1, .align = 1, .chunk = 1, .n_parts = 1,
                 .wake_latency = FD_FIRST_WAKE_LATENCY, .wake_cost = FD_FIRST_WAKE_COST,
                 .rate = FD_FIRST_RATE};

    /* Deadlines shared between threads: relaxed atomic doubles. */
    static double fd_get_deadline(double *deadline) {
        double value;
        __atomic_load(deadline, &value, __ATOMIC_RELAXED);
        return value;
    }

    static void fd_set_deadline(double *deadline, double value) {
        __atomic_store(deadline, &value, __ATOMIC_RELAXED);
    }

    /* Move a running estimate a quarter of the way to a new sample. */
    static void fd_estimate(double *estimate, double sample) {
        double value = fd_get_deadline(estimate);
        fd_set_deadline(estimate, value + 0.25 * (sample - value));
    }

    static void fd_long_spin_cut(double now);

    /* How long to back off (run alone, or not wake parked workers back to back)
       after a job lost `lost` seconds against the update alone, or a thread was
       without its core that long: FD_BACKOFF_PER_LOSS times it, between
       FD_MIN_BACKOFF and FD_MAX_BACKOFF. Under an overload that lasts, one such
       job per window then costs at most 1/FD_BACKOFF_PER_LOSS (5%) of the time,
       and a time slice lost (milliseconds) still backs off for about 0.1 s; a
       passing preemption (a VM's host taking a vCPU for 100 us, a few times a
       second on this machine: its steal time) costs a few milliseconds of updates
       run alone, not 0.1 s of them. */
    static double fd_backoff_window(double lost) {
        double window = FD_BACKOFF_PER_LOSS * lost;
        return window < FD_MIN_BACKOFF ? FD_MIN_BACKOFF : window > FD_MAX_BACKOFF ? FD_MAX_BACKOFF : window;
    }

    static fd_part fd_parts[FD_MAX_THREADS] __attribute__((aligned(64)));
    static unsigned long fd_first_generation[FD_MAX_THREADS];
    /* Until when worker k spins for the next job: 0 while it is parked, infinite
       while it runs a job or has just been woken. */
    static double fd_spin_until[FD_MAX_THREADS];

    static double fd_now(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return ts.tv_sec + 1e-9 * ts.tv_nsec;
    }

    /* CPU time of the calling thread: a system call, so only read around long jobs. */
    static double fd_thread_cpu(void) {
        struct timespec ts;
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
        return ts.tv_sec + 1e-9 * ts.tv_nsec;
    }

    /* Start of part k of the current job (k = n_parts gives n_items). */
    static Py_ssize_t fd_edge(int k) {
        if (k >= fd_pool.n_parts) return fd_pool.n_items;
        return (fd_pool.n_items * k / fd_pool.n_parts) / fd_pool.align * fd_pool.align;
    }

    /* Claim one chunk of part k, from its front (the owner) or its back (a thief). */
    static int fd_take(int k, int from_back, Py_ssize_t *begin, Py_ssize_t *end) {
        uint64_t s = __atomic_load_n(&fd_parts[k].claim, __ATOMIC_RELAXED), t;
        uint32_t front, back, c;
        for (;;) {
            front = (uint32_t)s;
            back = (uint32_t)(s >> 32);
            if (front >= back) return 0;
            c = from_back ? back - 1 : front;
            t = from_back ? ((uint64_t)c << 32) | front : ((uint64_t)back << 32) | (front + 1);
            if (__atomic_compare_exchange_n(&fd_parts[k].claim, &s, t, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
                break;
        }
        *begin = fd_edge(k) + (Py_ssize_t)c * fd_pool.chunk;
        *end = *begin + fd_pool.chunk;
        if (*end > fd_edge(k + 1)) *end = fd_edge(k + 1);
        return 1;
    }

    /* Run what is left of part `self`, from its front (its back in a reversed job). */
    static void fd_work_own(int self) {
        Py_ssize_t begin, end;
        while (fd_take(self, fd_pool.reverse, &begin, &end)) fd_pool.fn(fd_pool.ctx, begin, end);
    }

    /* Take what is left of the other parts, from the end their owners reach last. */
    static void fd_steal(int self) {
        Py_ssize_t begin, end;
        int i, n = fd_pool.n_parts;
        for (i = 1; i < n; i++)
            while (fd_take((self + i) % n, !fd_pool.reverse, &begin, &end)) fd_pool.fn(fd_pool.ctx, begin, end);
    }

    /* The last job of the calling thread: its data, size and threads, and its direction. */
    static __thread struct { const void *key; Py_ssize_t n_items; int n_parts, reversed; } fd_last_job;

    /* Should this job run its parts back to front? Yes if the calling thread's
       previous job had the same data (`key`, the first array's address; NULL: no
       identity, never reversed), size and thread count and ran front to back, and
       conversely. Back-to-back calls on the same arrays then alternate directions
       (a serpentine order): each thread starts on the chunks of its part that it
       ran last, which are still in its core's L2 cache, instead of the ones it ran
       first, which the rest of its part has evicted (a cache holding less than the
       part, swept in one direction over and over, keeps nothing useful). A part of
       the L2's size (2^18 float32 Adam elements on 2 threads here) then runs mostly
       from L2 instead of L3, and a larger one saves an L2's worth of its traffic.
       Every rule is elementwise: any order gives the same bits. */
    static int fd_job_reversed(const void *key, Py_ssize_t n_items, int n_parts) {
        int reverse = key != NULL && fd_pool.serpentine && key == fd_last_job.key
                      && n_items == fd_last_job.n_items && n_parts == fd_last_job.n_parts
                      && !fd_last_job.reversed;
        fd_last_job.key = key;
        fd_last_job.n_items = n_items;
        fd_last_job.n_parts = n_parts;
        fd_last_job.reversed = reverse;
        if (reverse) __atomic_fetch_add(&fd_pool.reversed, 1, __ATOMIC_RELAXED);
        return reverse;
    }

    /* Run fn over [0, n_items) on the calling thread alone, in chunks from the back
       if `reverse`. */
    static void fd_run_alone(Py_ssize_t n_items, Py_ssize_t align, Py_ssize_t chunk, int reverse,
                             fd_range_fn fn, const void *ctx) {
        Py_ssize_t end;
        if (n_items <= 0) return;
        chunk = (chunk < align ? align : chunk) / align * align;
        if (!reverse || chunk >= n_items) {
            fn(ctx, 0, n_items);
            return;
        }
        for (end = n_items; end > 0; end = (end - 1) / chunk * chunk)
            fn(ctx, (end - 1) / chunk * chunk, end);
    }

    /* Spin for spin_seconds (longer if a hint asks), then park, until the
       generation moves past `seen`. Park early if the spin was descheduled (16
       pauses took over 50 us): the machine has more runnable threads than cores,
       and spinning would take a core from them, or from the thread that will call
       us. A worker that slept measures how long its wake-up took. */
    static unsigned long fd_wait_for_job(int self, unsigned long seen) {
        unsigned long g;
        double now = fd_now(), before, until = now + fd_pool.spin_seconds, hinted;
        double yield_at = now + FD_SPIN_YIELD_EVERY, own_spin_until = until;
        unsigned i;
        int slept = 0;
        fd_set_deadline(&fd_spin_until[self], until);
        for (i = 1;; i++) {
            g = __atomic_load_n(&fd_pool.generation, __ATOMIC_ACQUIRE);
            if (g != seen) {
                fd_set_deadline(&fd_spin_until[self], INFINITY);
                return g;
            }
            if ((i & 15) == 0) {
                before = now;
                now = fd_now();
                if (now - before > 5e-5 && fd_pool.backoff) {   /* descheduled */
                    /* During a long spin (past spin_seconds) it says only that
                       another thread wants this core between two steps: spin
                       no longer, but back-to-back calls may still wake us. */
                    if (before < own_spin_until) {
                        fd_set_deadline(&fd_pool.no_burst_until, now + fd_backoff_window(now - before));
                        fd_set_deadline(&fd_pool.no_long_spin_until, now + fd_backoff_window(now - before));
                    } else {
                        fd_long_spin_cut(now);
                    }
                    __atomic_fetch_add(&fd_pool.backoff_why[FD_WHY_SPIN_DESCHEDULED], 1, __ATOMIC_RELAXED);
                    break;
                }
                if (now >= until) {
                    hinted = fd_get_deadline(&fd_pool.keep_spinning_until);
                    if (hinted <= now) break;
                    until = hinted;
                    fd_set_deadline(&fd_spin_until[self], until);
                }
                /* Let a thread waiting for this core have it (then the gap above
                   parks us): spinning costs others at most this long. */
                if (now >= yield_at) {
                    sched_yield();
                    yield_at = now + FD_SPIN_YIELD_EVERY;
                }
            }
            fd_cpu_relax();
        }
        fd_set_deadline(&fd_spin_until[self], 0.0);
        pthread_mutex_lock(&fd_pool.lock);
        /* Sequentially consistent with the caller's (generation++, read sleepers):
           either we see the new generation or it sees us asleep and signals. */
        __atomic_fetch_add(&fd_pool.sleepers, 1, __ATOMIC_SEQ_CST);
        while ((g = __atomic_load_n(&fd_pool.generation, __ATOMIC_SEQ_CST)) == seen) {
            pthread_cond_wait(&fd_pool.wake, &fd_pool.lock);
            slept = 1;
        }
        fd_set_deadline(&fd_spin_until[self], INFINITY);
        __atomic_fetch_sub(&fd_pool.sleepers, 1, __ATOMIC_SEQ_CST);
        pthread_mutex_unlock(&fd_pool.lock);
        if (slept) {
            now = fd_now();
            before = now - fd_get_deadline(&fd_pool.woken_at);
            if (before >= 0.0) {
                fd_estimate(&fd_pool.wake_latency, before < FD_MAX_WAKE_SAMPLE ? before : FD_MAX_WAKE_SAMPLE);
                fd_set_deadline(&fd_pool.sampled_at, now);
            }
        }
        return g;
    }

    /* Let workers run on every CPU of the OpenMP places: with OMP_PROC_BIND set,
       libgomp pinned the importing thread to one CPU, and threads inherit that. */
    static void fd_unpin(pthread_attr_t *attr) {
    #ifdef __linux__
        cpu_set_t set;
        int p, j, n, ids[CPU_SETSIZE];
        if (omp_get_num_places() <= 0) return;
        CPU_ZERO(&set);
        for (p = 0; p < omp_get_num_places(); p++) {
            n = omp_get_place_num_procs(p);
            if (n <= 0 || n > CPU_SETSIZE) continue;
            omp_get_place_proc_ids(p, ids);
            for (j = 0; j < n; j++)
                if (ids[j] >= 0 && ids[j] < CPU_SETSIZE) CPU_SET(ids[j], &set);
        }
        if (CPU_COUNT(&set) > 0) pthread_attr_setaffinity_np(attr, sizeof(set), &set);
    #else
        (void)attr;
    #endif
    }

    static void *fd_worker_main(void *arg) {
        int self = (int)(intptr_t)arg;
        unsigned long seen = fd_first_generation[self];
        unsigned int gate;
        for (;;) {
            seen = fd_wait_for_job(self, seen);
            gate = __atomic_load_n(&fd_pool.gate, __ATOMIC_RELAXED);
            do {
                if (!(gate & FD_GATE_OPEN)) break;   /* too late: the caller did it all */
            } while (!__atomic_compare_exchange_n(&fd_pool.gate, &gate, gate + 1, 1,
                                                  __ATOMIC_ACQUIRE, __ATOMIC_RELAXED));
            if (!(gate & FD_GATE_OPEN)) continue;
            __atomic_store_n(&fd_pool.joined, 1, __ATOMIC_RELAXED);
            if (self < fd_pool.n_parts) {
                fd_work_own(self);
                fd_steal(self);
            }
            __atomic_fetch_sub(&fd_pool.gate, 1, __ATOMIC_RELEASE);
        }
        return NULL;
    }

    /* Start workers up to `want`; returns how many exist (thread creation may fail). */
    static int fd_start_workers(int want) {
        pthread_attr_t attr;
        pthread_t thread;
        sigset_t all, previous;
        if (want > FD_MAX_THREADS - 1) want = FD_MAX_THREADS - 1;
        if (fd_pool.n_workers >= want) return want;
        if (pthread_attr_init(&attr) != 0) return fd_pool.n_workers;
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        fd_unpin(&attr);
        sigfillset(&all);   /* signals stay with the interpreter's threads */
        pthread_sigmask(SIG_SETMASK, &all, &previous);
        while (fd_pool.n_workers < want) {
            int self = fd_pool.n_workers + 1;
            fd_first_generation[self] = __atomic_load_n(&fd_pool.generation, __ATOMIC_ACQUIRE);
            fd_set_deadline(&fd_spin_until[self], INFINITY);   /* starting: as good as awake */
            if (pthread_create(&thread, &attr, fd_worker_main, (void *)(intptr_t)self) != 0) break;
            fd_pool.n_workers++;
        }
        pthread_sigmask(SIG_SETMASK, &previous, NULL);
        pthread_attr_destroy(&attr);
        return fd_pool.n_workers < want ? fd_pool.n_workers : want;
    }

    /* A long spin was cut short: another thread wanted the core between two steps
       (the worker was descheduled, or did not join from it). No long spins for
       10 ms, doubling with each cut in a row up to 640 ms, so that a loop whose
       work between steps uses every core soon stops spinning into it, while a
       passing collision costs only the next few steps' spins. */
    static void fd_long_spin_cut(double now) {
        int cuts = __atomic_add_fetch(&fd_pool.long_spin_cuts, 1, __ATOMIC_RELAXED);
        fd_set_deadline(&fd_pool.no_long_spin_until, now + 0.01 * (double)(1 << (cuts < 7 ? cuts - 1 : 6)));
    }

    /* Ask idle workers to spin at least until `until` (they look when their own
       spin time runs out). */
    static void fd_keep_spinning(double until) {
        if (until > fd_get_deadline(&fd_pool.keep_spinning_until))
            fd_set_deadline(&fd_pool.keep_spinning_until, until);
    }

    /* After a job whose update takes `serial` seconds on one thread, started and
       ended at those times: keep the workers spinning past spin_seconds if the gap
       before this job was at most FD_SPIN_PER_WORK times that (FD_MAX_SPIN at
       most), for that long or a quarter more than the gap, whichever is longer
       (so that gaps near the limit do not alternate between caught and missed).
       A training loop calls again after a gap that changes little from step to
       step; a worker still spinning then takes its part at once, where a parked
       one costs a wake-up (a millisecond on a VM whose other vCPU halted) and
       then comes late. So the spin is spent only where the last gap says it will
       be caught (its cost is then at most that gap on the workers' cores), the gap
       it may cover grows with the work it saves, and a spinning worker yields its
       core to any thread that wants it (fd_wait_for_job). Not for a while after a
       spin was cut short (fd_long_spin_cut), nor under OMP_WAIT_POLICY=passive
       (spin_seconds 0). */
    static void fd_spin_after_job(double serial, double started, double ended) {
        double spin = fd_pool.spin_seconds, gap = started - fd_pool.job_ended, budget;
        fd_pool.job_ended = ended;
        if (!(spin > 0.0) || spin == INFINITY
            || (fd_pool.backoff && ended < fd_get_deadline(&fd_pool.no_long_spin_until)))
            return;
        budget = FD_SPIN_PER_WORK * serial;
        if (budget > FD_MAX_SPIN) budget = FD_MAX_SPIN;
        if (gap > budget) return;
        if (budget < 1.25 * gap) budget = 1.25 * gap < FD_MAX_SPIN ? 1.25 * gap : FD_MAX_SPIN;
        if (budget <= spin) return;
        fd_keep_spinning(ended + budget);
        fd_pool.long_spins++;
    }

    /* Wake the parked workers (the generation has moved on), timing the call and
       noting when, for the workers' measure of their wake-up latency. */
    static void fd_wake_sleepers(void) {
        double before = fd_now(), cost;
        fd_set_deadline(&fd_pool.woken_at, before);
        pthread_mutex_lock(&fd_pool.lock);
        pthread_cond_broadcast(&fd_pool.wake);
        pthread_mutex_unlock(&fd_pool.lock);
        cost = fd_now() - before;   /* long if the woken thread took our core */
        fd_estimate(&fd_pool.wake_cost, cost < FD_MAX_WAKE_SAMPLE ? cost : FD_MAX_WAKE_SAMPLE);
    }

    /* Run fn over [0, n_items) with up to n_parts threads (the caller is one):
       parts aligned to `align` items, claimed `chunk` items at a time. `key`
       identifies the data for the alternating order (fd_job_reversed); NULL for
       jobs whose order must not change. */
    static void fd_pool_run_keyed(int n_parts, Py_ssize_t n_items, Py_ssize_t align, Py_ssize_t chunk,
                                  fd_range_fn fn, const void *ctx, const void *key) {
        int k, woke = 0, timed, slow_wait = 0;
        Py_ssize_t n_chunks, limit;
        double started, own_done, waiting, waited = 0.0, cpu_started = 0.0, lost, ended, serial;
        if (n_parts > FD_MAX_THREADS) n_parts = FD_MAX_THREADS;
        if (n_parts <= 1 || n_items <= 0 || __atomic_exchange_n(&fd_pool.busy, 1, __ATOMIC_ACQUIRE)) {
            fd_run_alone(n_items, align, chunk, fd_job_reversed(key, n_items, 1), fn, ctx);
            return;
        }
        n_parts = 1 + fd_start_workers(n_parts - 1);
        if (n_parts == 1) {
            __atomic_store_n(&fd_pool.busy, 0, __ATOMIC_RELEASE);
            fd_run_alone(n_items, align, chunk, fd_job_reversed(key, n_items, 1), fn, ctx);
            return;
        }
        fd_pool.reverse = fd_job_reversed(key, n_items, n_parts);
        /* Chunks are whole multiples of align, and few enough to count in 32 bits. */
        chunk = (chunk < align ? align : chunk) / align * align;
        limit = ((n_items >> 30) / align + 1) * align;
        fd_pool.fn = fn;
        fd_pool.ctx = ctx;
        fd_pool.n_items = n_items;
        fd_pool.align = align;
        fd_pool.chunk = chunk > limit ? chunk : limit;
        fd_pool.n_parts = n_parts;
        for (k = 0; k < n_parts; k++) {
            n_chunks = (fd_edge(k + 1) - fd_edge(k) + fd_pool.chunk - 1) / fd_pool.chunk;
            __atomic_store_n(&fd_parts[k].claim, (uint64_t)n_chunks << 32, __ATOMIC_RELAXED);
        }
        __atomic_store_n(&fd_pool.joined, 0, __ATOMIC_RELAXED);
        /* Jobs that wake workers, and long ones, watch whether the caller loses its core. */
        timed = __atomic_load_n(&fd_pool.sleepers, __ATOMIC_RELAXED) > 0 || n_items >= ((Py_ssize_t)1 << 18);
        if (timed) cpu_started = fd_thread_cpu();
        started = fd_now();
        __atomic_store_n(&fd_pool.gate, FD_GATE_OPEN, __ATOMIC_RELEASE);
        __atomic_fetch_add(&fd_pool.generation, 1, __ATOMIC_SEQ_CST);
        fd_pool.jobs++;
        if (__atomic_load_n(&fd_pool.sleepers, __ATOMIC_SEQ_CST) > 0) {
            fd_pool.wakeups++;
            woke = 1;
            fd_wake_sleepers();
        }
        fd_work_own(0);
        /* No worker came while the caller ran its part: a spinning one would have
           within a microsecond, a woken one within tens. It has no core: other
           threads want it. Run alone for a while (spinning in its base spin), or
           stop waking workers for back-to-back calls (woken). A worker in a long
           spin past spin_seconds lost its core to another thread's work between
           two steps (another library's spinning team, say): it spins no longer,
           and the next calls wake it if that pays. The job itself lost nothing:
           the caller did it alone. */
        if (!__atomic_load_n(&fd_pool.joined, __ATOMIC_RELAXED)) {
            own_done = fd_now();
            if (!woke && own_done - started > 2e-5) {
                if (started - fd_pool.job_ended < fd_pool.spin_seconds) {
                    fd_set_deadline(&fd_pool.contended_until, own_done + fd_backoff_window(own_done - started));
                    fd_set_deadline(&fd_pool.no_long_spin_until, own_done + fd_backoff_window(own_done - started));
                    fd_pool.backoffs++;
                } else {
                    fd_long_spin_cut(own_done);
                }
                fd_pool.backoff_why[FD_WHY_NO_WORKER_JOINED]++;
            } else if (woke && own_done - started > 2e-4) {
                fd_set_deadline(&fd_pool.no_burst_until, own_done + fd_backoff_window(own_done - started));
                fd_pool.backoff_why[FD_WHY_WOKEN_WORKER_LATE]++;
            }
        }
        fd_steal(0);
        /* Close the job: late workers stay out; wait for the chunks still running. */
        if (__atomic_and_fetch(&fd_pool.gate, ~FD_GATE_OPEN, __ATOMIC_ACQ_REL) != 0) {
            waiting = fd_now();
            for (k = 1; __atomic_load_n(&fd_pool.gate, __ATOMIC_ACQUIRE) != 0; k++) {
                if (k % 1024 == 0) sched_yield();   /* an overloaded machine: let it run */
                else fd_cpu_relax();
            }
            waited = fd_now() - waiting;
            slow_wait = waited > 1e-4 && waited > 0.1 * (waiting - started);
        }
        ended = fd_now();
        /* Run alone for a while if the job took longer than the update alone would
           have (by the rate estimate), and it shows why: a wait far longer than a
           chunk (a worker lost its core mid-chunk), or the caller off its core for
           a fifth of the job (waking a worker can push the waker off its core when
           every core is busy). A job that beat the serial time paid for its
           threads even if a core was taken from it for a while (a VM's host
           preempting a vCPU): going serial would then lose. */
        serial = n_items / fd_get_deadline(&fd_pool.rate);
        if (ended - started > serial) {
            if (slow_wait) {
                fd_set_deadline(&fd_pool.contended_until, ended + fd_backoff_window(ended - started - serial));
                fd_pool.backoffs++;
                fd_pool.backoff_why[FD_WHY_LAST_CHUNK_WAIT]++;
            } else if (timed) {
                lost = (ended - started) - (fd_thread_cpu() - cpu_started);
                if (lost > 5e-5 && lost > 0.2 * (ended - started)) {
                    fd_set_deadline(&fd_pool.contended_until, ended + fd_backoff_window(ended - started - serial));
                    fd_pool.backoffs++;
                    fd_pool.backoff_why[FD_WHY_CALLER_DESCHEDULED]++;
                }
            }
        }
        /* A long spin caught this job: the core stayed ours through the gap. */
        if (!woke && __atomic_load_n(&fd_pool.joined, __ATOMIC_RELAXED)
            && started - fd_pool.job_ended >= fd_pool.spin_seconds)
            __atomic_store_n(&fd_pool.long_spin_cuts, 0, __ATOMIC_RELAXED);
        fd_spin_after_job(serial, started, ended);
        __atomic_store_n(&fd_pool.busy, 0, __ATOMIC_RELEASE);
    }

    /* fd_pool_run_keyed for jobs that always run front to back. */
    static void fd_pool_run(int n_parts, Py_ssize_t n_items, Py_ssize_t align, Py_ssize_t chunk,
                            fd_range_fn fn, const void *ctx) {
        fd_pool_run_keyed(n_parts, n_items, align, chunk, fn, ctx, NULL);
    }

    /* True if workers 1..n_workers spin and will for `margin` seconds more: a job
       posted now reaches them without a wake-up. */
    static int fd_pool_awake(int n_workers, double margin) {
        int k;
        double soon, until;
        if (fd_pool.n_workers < n_workers) return 0;
        soon = fd_now() + margin;
        for (k = 1; k <= n_workers; k++) {
            until = fd_get_deadline(&fd_spin_until[k]);
            if (until > 0.0 && fd_get_deadline(&fd_pool.keep_spinning_until) > until)   /* it will extend */
                until = fd_get_deadline(&fd_pool.keep_spinning_until);
            if (until <= soon) return 0;
        }
        return 1;
    }

    static int fd_pool_contended(void) {
        return fd_pool.backoff && fd_now() < fd_get_deadline(&fd_pool.contended_until);
    }

    /* Does waking parked workers pay for an update of `total` elements on n_parts
       threads, if they were woken `head_start` seconds ago? The caller runs alone
       until they arrive (the measured wake-up latency), then the threads share
       what is left; the caller also makes the wake-up call and may wait for the
       last chunk a worker took. Yes if that is at most 90% of the serial time: a
       wrong guess, with estimates off by a few microseconds, then still costs less
       than the 5% a wake-up may cost against one thread. */
    static int fd_wake_pays(Py_ssize_t total, int n_parts, Py_ssize_t chunk, double head_start) {
        double rate = fd_get_deadline(&fd_pool.rate), serial = total / rate;
        double latency = fd_get_deadline(&fd_pool.wake_latency), late;
        if (fd_now() - fd_get_deadline(&fd_pool.sampled_at) > FD_WAKE_SAMPLE_MAX_AGE && latency > FD_FIRST_WAKE_LATENCY)
            latency = FD_FIRST_WAKE_LATENCY;
        late = latency - head_start;
        if (late < 0.0) late = 0.0;
        if (late >= serial) return 0;
        return late + (serial - late) / n_parts + fd_get_deadline(&fd_pool.wake_cost) + chunk / rate
               <= 0.9 * serial;
    }

    /* Seconds since parked workers were woken, if that wake-up is still under way. */
    static double fd_wake_head_start(void) {
        double since = fd_now() - fd_get_deadline(&fd_pool.woken_at);
        if (__atomic_load_n(&fd_pool.sleepers, __ATOMIC_RELAXED) == 0) return 0.0;
        return since < 2.0 * fd_get_deadline(&fd_pool.wake_latency) ? since : 0.0;
    }

    /* The hint: an update of about `total` elements on n_parts threads is coming
       (the optimizer's step has begun). Spinning workers keep spinning for it;
       parked ones are woken now, so that their wake-up latency overlaps the
       caller's validation, if the update would pay for workers already up and the
       wake-up call costs under 5% of it: the most the hint loses should the update
       run alone after all. Starts the workers if there are none yet. Returns 1 if
       it woke workers or kept them spinning. */
    static int fd_pool_prepare(Py_ssize_t total, int n_parts, Py_ssize_t chunk) {
        double now;
        if (n_parts > FD_MAX_THREADS) n_parts = FD_MAX_THREADS;
        if (n_parts <= 1 || fd_pool_contended()) return 0;
        now = fd_now();
        fd_keep_spinning(now + fd_pool.spin_seconds);
        if (fd_pool_awake(n_parts - 1, 0.0)) {
            fd_pool.hints++;
            return 1;
        }
        if (fd_get_deadline(&fd_pool.wake_cost) > 0.05 * total / fd_get_deadline(&fd_pool.rate)
            || !fd_wake_pays(total, n_parts, chunk, INFINITY)) return 0;
        if (__atomic_exchange_n(&fd_pool.busy, 1, __ATOMIC_ACQUIRE)) return 0;  /* a job runs: they are up */
        fd_start_workers(n_parts - 1);
        /* A generation with the gate closed: workers wake, find no job, spin. */
        __atomic_fetch_add(&fd_pool.generation, 1, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&fd_pool.sleepers, __ATOMIC_SEQ_CST) > 0) fd_wake_sleepers();
        fd_pool.hints++;
        __atomic_store_n(&fd_pool.busy, 0, __ATOMIC_RELEASE);
        return 1;
    }

    /* Each call's threads and time, for the estimate of one thread's rate: calls
       that ran alone, or on workers that were already awake. Per calling thread. */
    static __thread struct { double started; Py_ssize_t total; int parts, counts; } fd_call;

    static void fd_call_begin(Py_ssize_t total, int parts, int counts) {
        fd_call.counts = counts;
        if (!counts) return;
        fd_call.total = total;
        fd_call.parts = parts;
        fd_call.started = fd_now();
    }

    static void fd_call_end(void) {
        double elapsed;
        if (!fd_call.counts) return;
        fd_call.counts = 0;
        elapsed = (fd_now() - fd_call.started) * fd_call.parts;
        if (elapsed > 0.0) fd_estimate(&fd_pool.rate, fd_call.total / elapsed);
    }

    static double fd_pool_wake_latency(void) { return fd_get_deadline(&fd_pool.wake_latency); }
    static double fd_pool_wake_cost(void) { return fd_get_deadline(&fd_pool.wake_cost); }
    static double fd_pool_rate(void) { return fd_get_deadline(&fd_pool.rate); }
    static unsigned long fd_pool_hints(void) { return fd_pool.hints; }
    static unsigned long fd_pool_long_spins(void) { return fd_pool.long_spins; }
    /* Set the estimates (for tests and experiments); a value <= 0 keeps one. */
    static void fd_pool_set_estimates(double latency, double cost, double rate) {
        if (latency > 0.0) {
            fd_set_deadline(&fd_pool.wake_latency, latency);
            fd_set_deadline(&fd_pool.sampled_at, fd_now());
        }
        if (cost > 0.0) fd_set_deadline(&fd_pool.wake_cost, cost);
        if (rate > 0.0) fd_set_deadline(&fd_pool.rate, rate);
    }
    static int fd_pool_burst_allowed(void) {
        return !fd_pool.backoff || fd_now() >= fd_get_deadline(&fd_pool.no_burst_until);
    }
    static void fd_pool_set_backoff(int on) { fd_pool.backoff = on; }
    static void fd_pool_set_serpentine(int on) { fd_pool.serpentine = on; }
    static int fd_pool_get_serpentine(void) { return fd_pool.serpentine; }
    static unsigned long fd_pool_reversed(void) { return __atomic_load_n(&fd_pool.reversed, __ATOMIC_RELAXED); }
    static int fd_pool_get_backoff(void) { return fd_pool.backoff; }
    static unsigned long fd_pool_backoffs(void) { return fd_pool.backoffs; }
    static unsigned long fd_pool_backoff_why(int why) {
        return why >= 0 && why < FD_N_WHY ? __atomic_load_n(&fd_pool.backoff_why[why], __ATOMIC_RELAXED) : 0;
    }
    static unsigned long fd_pool_jobs(void) { return fd_pool.jobs; }
    static unsigned long fd_pool_wakeups(void) { return fd_pool.wakeups; }
    static int fd_pool_workers(void) { return fd_pool.n_workers; }
    static int fd_pool_sleepers(void) { return __atomic_load_n(&fd_pool.sleepers, __ATOMIC_RELAXED); }
    static unsigned long fd_pool_forks_seen(void) { return fd_pool.forks_seen; }
    static double fd_pool_get_spin(void) { return fd_pool.spin_seconds; }
    static void fd_pool_set_spin(double seconds) { fd_pool.spin_seconds = seconds; }

    /* In a forked child only the forking thread exists: forget the workers. */
    static void fd_pool_after_fork_in_child(void) {
        pthread_mutex_init(&fd_pool.lock, NULL);
        pthread_cond_init(&fd_pool.wake, NULL);
        fd_pool.n_workers = 0;
        fd_pool.sleepers = 0;
        fd_pool.woken_at = 0.0;
        fd_pool.sampled_at = 0.0;
        fd_pool.gate = 0;
        fd_pool.busy = 0;
        fd_pool.forks_seen++;
    }

    static int fd_pool_install_fork_handler(void) {
        return pthread_atfork(NULL, NULL, fd_pool_after_fork_in_child);
    }
    """
    ctypedef void (*fd_range_fn)(const void* ctx, Py_ssize_t begin, Py_ssize_t end) noexcept nogil
    void fd_pool_run(int n_parts, Py_ssize_t n_items, Py_ssize_t align, Py_ssize_t chunk,
                     fd_range_fn fn, const void* ctx) noexcept nogil
    void fd_pool_run_keyed(int n_parts, Py_ssize_t n_items, Py_ssize_t align, Py_ssize_t chunk,
                           fd_range_fn fn, const void* ctx, const void* key) noexcept nogil
    void fd_pool_set_serpentine(int on) noexcept nogil
    bint fd_pool_get_serpentine() noexcept nogil
    unsigned long fd_pool_reversed() noexcept nogil
    bint fd_pool_awake(int n_workers, double margin) noexcept nogil
    bint fd_pool_contended() noexcept nogil
    bint fd_wake_pays(Py_ssize_t total, int n_parts, Py_ssize_t chunk, double head_start) noexcept nogil
    double fd_wake_head_start() noexcept nogil
    bint fd_pool_prepare(Py_ssize_t total, int n_parts, Py_ssize_t chunk) noexcept nogil
    void fd_call_begin(Py_ssize_t total, int parts, int counts) noexcept nogil
    void fd_call_end() noexcept nogil
    double fd_pool_wake_latency() noexcept nogil
    double fd_pool_wake_cost() noexcept nogil
    double fd_pool_rate() noexcept nogil
    unsigned long fd_pool_hints() noexcept nogil
    unsigned long fd_pool_long_spins() noexcept nogil
    void fd_pool_set_estimates(double latency, double cost, double rate) noexcept nogil
    bint fd_pool_burst_allowed() noexcept nogil
    void fd_pool_set_backoff(int on) noexcept nogil
    bint fd_pool_get_backoff() noexcept nogil
    unsigned long fd_pool_backoffs() noexcept nogil
    unsigned long fd_pool_backoff_why(int why) noexcept nogil
    unsigned long fd_pool_jobs() noexcept nogil
    unsigned long fd_pool_wakeups() noexcept nogil
    int fd_pool_workers() noexcept nogil
    int fd_pool_sleepers() noexcept nogil
    unsigned long fd_pool_forks_seen() noexcept nogil
    double fd_pool_get_spin() noexcept nogil
    void fd_pool_set_spin(double seconds) noexcept nogil
    int fd_pool_install_fork_handler() noexcept nogil
    double fd_now() noexcept nogil


cdef enum:
    MAX_ROLES = 8
    # Part and chunk boundaries fall on multiples of 64 elements (whole cache lines
    # for either dtype), so two threads never write the same line.
    PART_ALIGN = 64
    # Elements a thread claims at a time: small enough that a thread arriving late
    # still finds work, and that nobody waits long for the last chunk; large
    # enough that claiming (one compare-and-swap) costs well under 1 %.
    CHUNK_ELEMENTS = 16384

# A thread is only given a part of at least MIN_ELEMENTS_PER_THREAD elements;
# smaller updates run on the calling thread alone. Then (choose_parts):
#
# * workers awake (spinning, and for AWAKE_MARGIN more): handing them a job costs a
#   fraction of a microsecond: they get it;
# * workers parked: the caller pays a wake-up call (a system call), and runs alone
#   until they are up (their scheduling latency: tens of microseconds, more in a
#   VM whose other vCPU halted, a time slice on a busy machine). Stealing means it
#   never waits for them, but the time they are late is time the caller works
#   alone. So they are woken only if fd_wake_pays: the update is long enough
#   against the latency and the cost, as measured on this machine (every wake-up
#   is timed, and the rate of every update). On a busy machine the latency is a
#   time slice and only the largest updates wake them. Parts of
#   MIN_ELEMENTS_PER_THREAD_COLD elements or more always do (milliseconds of work:
#   more than the largest latency sample counts for);
# * back to back (the previous call ended less than half the spin time ago),
#   parked workers are woken at the warm threshold: they stay up for the next calls.
cdef Py_ssize_t MIN_ELEMENTS_PER_THREAD = 16384
cdef Py_ssize_t MIN_ELEMENTS_PER_THREAD_COLD = 1 << 21
# Workers whose spin ends sooner than this count as parked: the job may miss them.
cdef double AWAKE_MARGIN = 2e-5
cdef double last_call_end = -INFINITY   # monotonic seconds; written by calling threads


def _spin_from_environment():
    """OMP_WAIT_POLICY, as libgomp reads it: passive never spins, active never parks."""
    import os

    policy = os.environ.get("OMP_WAIT_POLICY", "").strip().lower()
    if policy == "passive":
        return 0.0
    if policy == "active":
        return INFINITY
    return 1e-3


fd_pool_set_spin(_spin_from_environment())
if fd_pool_install_fork_handler() != 0:
    raise ImportError("fastdescent: pthread_atfork failed; threads would not be fork-safe")


def get_min_elements_per_thread(bint cold=False):
    """Smallest part a thread is given (``cold``: the part size from which parked
    workers are always woken; smaller parts wake them when the measured wake-up
    latency pays back)."""
    return MIN_ELEMENTS_PER_THREAD_COLD if cold else MIN_ELEMENTS_PER_THREAD


def set_min_elements_per_thread(Py_ssize_t n, cold=None):
    """Change the serial thresholds (for benchmarking them): ``n`` for awake
    workers, ``cold`` (default: ``n`` too) for always waking parked ones."""
    global MIN_ELEMENTS_PER_THREAD, MIN_ELEMENTS_PER_THREAD_COLD
    cdef Py_ssize_t n_cold = n if cold is None else cold
    if n < 1 or n_cold < 1:
        raise ValueError(f"the minimum part size must be at least 1, got {n} and {n_cold}")
    MIN_ELEMENTS_PER_THREAD = n
    MIN_ELEMENTS_PER_THREAD_COLD = n_cold


def get_spin_seconds():
    """How long an idle worker spins before it parks (inf: never parks)."""
    return fd_pool_get_spin()


def set_spin_seconds(double seconds):
    """Change how long idle workers spin before parking (0: park at once). Workers
    already spinning keep their current deadline."""
    if not seconds >= 0:
        raise ValueError(f"the spin time must be >= 0 seconds, got {seconds}")
    fd_pool_set_spin(seconds)


def set_overload_backoff(bint enabled):
    """Turn the overload back-offs off (to measure what threads could do on a
    machine whose other processes are known to be idle) or on again (the default).
    Off, a spinning worker also keeps spinning when it finds it was descheduled."""
    fd_pool_set_backoff(enabled)


def set_alternating_order(bint enabled):
    """Turn the alternating order of back-to-back calls on the same arrays off (to
    measure what it gains: every call then runs each part front to back) or on
    again (the default). Changes no result."""
    fd_pool_set_serpentine(enabled)


def pool_state():
    """The worker pool of this kernel module: workers started and parked, spin
    time, whether back-to-back calls on the same arrays alternate directions and
    how many calls (alone or not) ran back to front (``reversed_jobs``),
    parallel jobs run and how many of them had to wake workers, wake-up
    hints taken, jobs after which the workers were asked to spin longer than the
    spin time (``long_spins``), back-offs to serial after a preempted worker (and
    whether one is in force; ``backoff_reasons`` counts them, and the pauses of
    back-to-back wake-ups and long spins, by reason),
    the forks this process has gone through since the pool was made,
    and the policy's running estimates: a parked worker's wake-up latency and the
    waking thread's cost (seconds), and one thread's update rate (elements per
    second)."""
    return {"workers": fd_pool_workers(), "parked": fd_pool_sleepers(),
            "jobs": fd_pool_jobs(), "wakeups": fd_pool_wakeups(), "hints": fd_pool_hints(),
            "long_spins": fd_pool_long_spins(),
            "spin_seconds": fd_pool_get_spin(), "backoff_enabled": fd_pool_get_backoff(),
            "alternating_order": fd_pool_get_serpentine(), "reversed_jobs": fd_pool_reversed(),
            "backoffs": fd_pool_backoffs(),
            "backoff_reasons": {why: fd_pool_backoff_why(k) for k, why in enumerate(
                ("spin_descheduled", "no_worker_joined", "woken_worker_late", "last_chunk_wait",
                 "caller_descheduled"))},
            "backing_off": fd_pool_contended(), "forks_seen": fd_pool_forks_seen(),
            "wake_latency": fd_pool_wake_latency(), "wake_cost": fd_pool_wake_cost(),
            "rate": fd_pool_rate()}


def set_wake_estimates(double latency=0.0, double cost=0.0, double rate=0.0):
    """Set the policy's running estimates (for tests and experiments; later
    measurements move them again): a parked worker's wake-up ``latency`` and the
    waking thread's ``cost`` in seconds, one thread's ``rate`` in elements per
    second. 0 leaves an estimate as it is."""
    if not (latency >= 0 and cost >= 0 and rate >= 0):
        raise ValueError(f"estimates must be >= 0, got {latency}, {cost}, {rate}")
    fd_pool_set_estimates(latency, cost, rate)


def parts_for(Py_ssize_t n_elements, int n_threads):
    """How many threads an update of ``n_elements`` on up to ``n_threads`` would
    get now (the policy's decision, without running anything)."""
    return choose_parts_now(n_elements, n_threads)


def prepare_threads(Py_ssize_t n_elements, int n_threads):
    """Hint that an update of about ``n_elements`` on up to ``n_threads`` threads
    is coming (an optimizer's step has begun): spinning workers keep spinning for
    it, and parked ones are woken now if the update would pay for awake workers
    and the wake-up call is at most 5% of it, so that their wake-up overlaps the
    caller's work before the kernel call. Costs a fraction of a microsecond, or
    one wake-up call; changes no result. True if it woke workers or kept them
    spinning."""
    cdef int n = <int>min(<Py_ssize_t>n_threads, n_elements // MIN_ELEMENTS_PER_THREAD)
    cdef bint prepared
    with nogil:
        prepared = fd_pool_prepare(n_elements, n, CHUNK_ELEMENTS)
    return prepared


cdef int choose_parts_now(Py_ssize_t total, int n_threads) noexcept nogil:
    """The policy above: how many threads an update of ``total`` elements gets."""
    cdef Py_ssize_t n = min(<Py_ssize_t>n_threads, total // MIN_ELEMENTS_PER_THREAD)
    if n <= 1 or fd_pool_contended():
        return 1
    if fd_pool_awake(<int>n - 1, AWAKE_MARGIN):
        return <int>n
    if total // MIN_ELEMENTS_PER_THREAD_COLD >= 2:
        return <int>min(n, total // MIN_ELEMENTS_PER_THREAD_COLD)
    if fd_now() - last_call_end < 0.5 * fd_pool_get_spin() and fd_pool_burst_allowed():
        return <int>n   # back to back: wake the workers now, they stay awake for the next calls
    if fd_wake_pays(total, <int>n, CHUNK_ELEMENTS, fd_wake_head_start()):
        return <int>n
    return 1


cdef int choose_parts(Py_ssize_t total, int n_threads) noexcept nogil:
    """How many threads an update of ``total`` elements gets; a call of at least a
    chunk is timed (until ``call_finished``) for the rate estimate if it runs
    alone or on workers already awake."""
    cdef int parts = choose_parts_now(total, n_threads)
    fd_call_begin(total, parts, total >= CHUNK_ELEMENTS and (parts == 1 or fd_pool_awake(parts - 1, 0.0)))
    return parts


cdef inline void call_finished() noexcept nogil:
    global last_call_end
    fd_call_end()
    last_call_end = fd_now()


# The element loop of a rule over one contiguous run of one tensor: ``rows[r]`` is
# the data pointer of role r for that tensor, the run is [start, start + n).
ctypedef void (*segment_fn)(void** rows, Py_ssize_t start, Py_ssize_t n, const void* args) noexcept nogil


cdef struct Plan:
    Py_ssize_t n_tensors
    Py_ssize_t n_roles
    Py_ssize_t total
    int n_parts
    int typenum                # NPY_FLOAT32 or NPY_FLOAT64
    Py_ssize_t* offsets        # n_tensors + 1 prefix sums of the tensor sizes
    void** rows                # rows[t * n_roles + r]: data of role r of tensor t


cdef int plan_init(Plan* plan, tuple roles, int n_threads) except -1:
    """Gather the data pointers of ``roles`` (lists of arrays, or None) into ``plan``.

    On error the caller still owns what was allocated: call ``plan_free``.

    The functional faces validate every buffer first (``_runtime.check_buffers``);
    the checks here are only the cheap ones that keep a direct call of a private
    kernel from reading out of bounds: list lengths, types, sizes and layout.
    """
    cdef Py_ssize_t r, t, n
    cdef list params = <list?>roles[0]
    cdef list role
    cdef cnp.ndarray a
    plan.n_roles = len(roles)
    plan.n_tensors = len(params)
    if plan.n_roles > MAX_ROLES:
        raise ValueError(f"at most {MAX_ROLES} buffer roles")
    for r in range(1, plan.n_roles):
        if roles[r] is not None and len(<list?>roles[r]) != plan.n_tensors:
            raise ValueError(f"{len(<list>roles[r])} arrays for {plan.n_tensors} parameters "
                             f"in buffer role {r}: every role needs one array per parameter")
    if n_threads < 1:
        raise ValueError(f"n_threads must be at least 1, got {n_threads}")
    plan.offsets = <Py_ssize_t*>malloc((plan.n_tensors + 1) * sizeof(Py_ssize_t))
    plan.rows = <void**>malloc((plan.n_tensors * plan.n_roles + 1) * sizeof(void*))
    if plan.offsets == NULL or plan.rows == NULL:
        raise MemoryError()
    plan.typenum = cnp.NPY_FLOAT32
    plan.offsets[0] = 0
    for t in range(plan.n_tensors):
        a = <cnp.ndarray?>params[t]
        if t == 0:
            plan.typenum = cnp.PyArray_TYPE(a)
        n = cnp.PyArray_SIZE(a)
        plan.offsets[t + 1] = plan.offsets[t] + n
        for r in range(plan.n_roles):
            if roles[r] is None:
                plan.rows[t * plan.n_roles + r] = NULL
                continue
            role = <list>roles[r]
            a = <cnp.ndarray?>role[t]
            if (cnp.PyArray_TYPE(a) != plan.typenum or cnp.PyArray_SIZE(a) != n
                    or not cnp.PyArray_IS_C_CONTIGUOUS(a)):
                raise ValueError("kernel buffers must be contiguous, of one dtype and equal sizes")
            plan.rows[t * plan.n_roles + r] = cnp.PyArray_DATA(a)
    if plan.typenum != cnp.NPY_FLOAT32 and plan.typenum != cnp.NPY_FLOAT64:
        raise TypeError("kernels take float32 or float64 buffers")
    plan.total = plan.offsets[plan.n_tensors]
    plan.n_parts = choose_parts(plan.total, n_threads)
    return 0


cdef void plan_free(Plan* plan) noexcept:
    free(plan.offsets)
    free(plan.rows)
    plan.offsets = NULL
    plan.rows = NULL


cdef Py_ssize_t chunk_items(Py_ssize_t elements_per_item) noexcept nogil:
    """Items per chunk. Never above the thread threshold, so that tests lowering it
    to 1 also cut updates into many chunks and exercise stealing."""
    cdef Py_ssize_t elements = min(<Py_ssize_t>CHUNK_ELEMENTS, MIN_ELEMENTS_PER_THREAD)
    return max(1, elements // elements_per_item)


cdef struct SegmentJob:
    const Plan* plan
    segment_fn fn
    const void* args


cdef void run_range(const void* ctx, Py_ssize_t begin, Py_ssize_t end) noexcept nogil:
    """Call the job's segment function on every tensor run inside [begin, end), in
    index order."""
    cdef const SegmentJob* job = <const SegmentJob*>ctx
    cdef const Plan* plan = job.plan
    cdef Py_ssize_t lo = 0, hi = plan.n_tensors, mid, t, stop
    # The tensor holding index ``begin``: the last t with offsets[t] <= begin.
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if plan.offsets[mid] <= begin:
            lo = mid
        else:
            hi = mid
    t = lo
    while begin < end:
        stop = min(end, plan.offsets[t + 1])
        if stop > begin:
            job.fn(&plan.rows[t * plan.n_roles], begin - plan.offsets[t], stop - begin, job.args)
            begin = stop
        t += 1


cdef void run_plan(const Plan* plan, segment_fn fn, const void* args) noexcept nogil:
    """Run ``fn`` over the whole plan with ``plan.n_parts`` threads."""
    cdef SegmentJob job
    job.plan = plan
    job.fn = fn
    job.args = args
    fd_pool_run_keyed(plan.n_parts, plan.total, PART_ALIGN, chunk_items(1), run_range, &job,
                      plan.rows[0] if plan.n_tensors > 0 else NULL)


cdef int run_kernel(tuple roles, int n_threads, segment_fn fn32, segment_fn fn64,
                    const void* args) except -1:
    """Entry shared by every rule: gather ``roles``, release the GIL, run. Inside
    ``stored()`` (_storage.pxi), some roles are in low-precision storage: then
    ``fn32`` runs block by block on float32 copies of them."""
    cdef Plan plan
    cdef segment_fn fn
    if fd_pending_accumulation.armed:  # accumulate.pxi: this call also finishes a gradient accumulation
        return run_accumulating(roles, n_threads, fn32, fn64, args)
    cdef void* formats = fd_take_pending_storage()   # (formats, tensor ids) of stored()
    if formats != NULL:
        return run_stored(<tuple>formats, roles, n_threads, fn32, args)
    plan.offsets = NULL
    plan.rows = NULL
    try:
        plan_init(&plan, roles, n_threads)
        fn = fn32 if plan.typenum == cnp.NPY_FLOAT32 else fn64
        with nogil:
            run_plan(&plan, fn, args)
            call_finished()
    finally:
        plan_free(&plan)
    return 0
