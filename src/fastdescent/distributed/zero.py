r"""ZeRO stage 1 on MPI: any fastdescent optimizer, its state sharded across ranks.

Data parallelism replicates the model on every rank and splits the batch; the
optimizer state (Adam's two moments: twice the model) need not be replicated too.
Following ZeRO stage 1 (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations
Toward Training Trillion Parameter Models"), each of the N ranks keeps the state
of 1/N of the parameters and updates only those; one step is

1. the gradients, computed by each rank on its own data, are *reduce-scattered*:
   rank r receives the sum (or mean) over ranks of its own shard only;
2. each rank runs the optimizer's fused kernel on its shard;
3. the updated shards are *all-gathered*, so every rank again holds the whole model.

Each moves (N-1)/N of the model per rank, the same volume as the all-reduce of
plain data parallelism. The shards are contiguous, cache-line aligned pieces of
a flat arena per (group, dtype), so each collective is one call on one buffer.
"""

import copy
import math
import secrets

import numpy as np

from .. import CheckpointError, _checks, global_norm
from ..optim import ParamList
from ..optim.state import check_registrable
from . import checkpoint as ckpt
from ._layout import aligned_empty, buckets_of
from ._mpi import agreed, datatype, mpi, or_abort

REDUCTIONS = ("mean", "sum")
REDUCE_ORDERS = ("rank", "mpi")
# torch.nn.utils.clip_grad_norm_ divides by norm + 1e-6 (as fastdescent.optim does).
_CLIP_EPS = 1e-6
# The rank-ordered reduce-scatter moves at most this many elements per peer per
# round, which bounds its receive buffer to world_size * _ROUND elements.
_ROUND = 1 << 20
# Options the sharded optimizer applies itself, across ranks, instead of the rule.
_GLOBAL_OPTIONS = ("clip_grad_norm", "clip_grad_value", "skip_nonfinite")


class ShardedOptimizer:
    r"""A fastdescent optimizer whose state is sharded across the ranks of an MPI communicator.

    ::

        from mpi4py import MPI
        from fastdescent.distributed import ShardedOptimizer

        opt = ShardedOptimizer(model.params, fd.AdamW, MPI.COMM_WORLD, lr=1e-3, clip_grad_norm=1.0)
        model.params = opt.params                # the replicated parameters, in a flat arena
        for xb, yb in my_part_of_each_batch:
            model.loss_and_gradients(xb, yb)     # writes model.grads
            opt.step(model.grads)                # reduce-scatter, shard update, all-gather

    Run with ``mpiexec -n N python train.py``; every rank runs the same program.

    Parameters
    ----------
    params : list of ndarray, or list of dict
        As for any fastdescent optimizer: arrays, or groups with their own
        hyperparameters. The same shapes, dtypes and groups on every rank
        (checked). The values are *copied* into a flat arena and broadcast from
        rank 0, so every rank starts from rank 0's values: use ``opt.params`` (views
        into the arena) as the model's parameters from then on.
    optimizer_class : type
        Any fastdescent optimizer class (``fastdescent.Adam``, ``fastdescent.SGD``...).
        Each rank builds one over its shards, so it keeps state for its shard only.
        The rule must be elementwise: an update that looks at a whole tensor (a
        layer-wise trust ratio, Adafactor's norms and factored moments) would see
        only a slice of it, so such a rule (``spec.tensorwise``) raises TypeError.
    comm : mpi4py.MPI.Comm or None
        The ranks that share the work (None: ``MPI.COMM_WORLD``).
    reduce : {"mean", "sum"}
        How the ranks' gradients combine. "mean" (as DDP) multiplies the sum by
        1/N through the rule's ``grad_scale``: no extra pass.
    reduce_order : {"rank", "mpi"}
        "rank": each element's N contributions are added in rank order,
        ``((g_0 + g_1) + g_2) + ...``, on every rank and in every run (an
        all-to-all, then a local sum): the result is bit for bit that of one
        process summing the ranks' gradients in that order. "mpi": MPI's own
        ``Reduce_scatter_block``, whose order is the library's; with 2 ranks it is
        the same (``a + b == b + a`` exactly, so "rank" uses it too); with more,
        each summed element may differ from the rank-ordered sum by at most
        :math:`\gamma_{N-1} \sum_r |g_r|` with :math:`\gamma_k = k u / (1 - k u)`
        (u: the dtype's unit roundoff).
    clip_grad_norm, clip_grad_value, skip_nonfinite
        As for :class:`fastdescent.optim.Optimizer`, applied to the reduced
        gradients across all ranks: each rank takes the norm of its shard
        (``fastdescent.global_norm``), the N norms are all-gathered and combined in
        rank order (:math:`\sqrt{\sum_r n_r^2}`, scaled by a power of two so it
        cannot overflow), so every rank gets the same global norm and the same
        clip factor, and the same verdict of the non-finite guard: a step is
        skipped by all ranks or by none.
    **kwargs
        The rule's hyperparameters (``lr``, ``betas``...) and ``backend``,
        ``n_threads`` (per rank: with several ranks per machine, give each rank
        its share of the cores). ``flat`` is not accepted: the layout is always flat.

    Equality with one process: with ``reduce_order="rank"``, a power-of-two N (so
    that 1/N is exact) and no norm clipping, the parameters and state after any
    number of steps are bit for bit those of ``optimizer_class`` in one process
    stepped with the mean (or sum) of the ranks' gradients, summed in rank order.
    With norm clipping the global norm is the same up to the order of its double
    sums (a relative difference of a few units of 2**-53 times the number of
    4096-element blocks); the clip factor, rounded to float32 for float32
    parameters, then nearly always rounds to the same value.

    Collective calls: the constructor, ``step``, ``state_dict``,
    ``load_state_dict``, ``save`` and ``load`` communicate, so every rank of
    ``comm`` must call them in the same order (as any MPI collective).

    Errors: a wrong argument on any rank raises on every rank (the others raise
    :class:`RankError`) and changes nothing. An exception on one rank in the
    middle of a collective step, save or load (after every rank has agreed to go
    on) aborts the communicator (``MPI_Abort``) after printing it, rather than
    leaving the other ranks waiting forever.

    Attributes
    ----------
    param_groups : list of dict
        ``"params"`` (the views, fixed) and every hyperparameter: write
        hyperparameters between steps (schedulers do), the same on every rank.
    shard_optimizer : optimizer_class
        This rank's optimizer, over one 1-D slice per (group, dtype).
    skipped_steps, last_grad_norm
        As for :class:`fastdescent.optim.Optimizer`.
    """

    def __init__(self, params, optimizer_class, comm=None, *, reduce="mean", reduce_order="rank",
                 clip_grad_norm=None, clip_grad_value=None, skip_nonfinite=False, **kwargs):
        MPI = mpi()
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.world_size = self.comm.Get_rank(), self.comm.Get_size()
        self.skipped_steps = 0
        self.last_grad_norm = None
        self._registered = {}
        with agreed(self.comm, "ShardedOptimizer()"):
            self._build(params, optimizer_class, reduce, reduce_order, clip_grad_norm, clip_grad_value,
                        skip_nonfinite, kwargs)
        self._check_same_everywhere()
        with or_abort(self.comm, "the broadcast of rank 0's parameters"):
            for arena in self._param_arenas:
                self.comm.Bcast(arena, root=0)

    def _build(self, params, optimizer_class, reduce, reduce_order, clip_grad_norm, clip_grad_value,
               skip_nonfinite, kwargs):
        if not isinstance(optimizer_class, type):
            raise TypeError(f"optimizer_class must be an optimizer class such as fastdescent.Adam, got {optimizer_class!r}")
        if "flat" in kwargs:
            raise TypeError("ShardedOptimizer is always flat: do not pass flat=")
        spec = getattr(optimizer_class, "spec", None)
        if spec is not None and spec.tensorwise:
            raise TypeError(f"{optimizer_class.__name__} updates each parameter as a whole (its norms, its rows and "
                            "columns): it cannot run on shards of a flat arena")
        if "accumulate_steps" in kwargs:  # it would reduce, clip and all-gather at every micro-step
            raise TypeError("ShardedOptimizer does not accumulate: sum the micro-batches' gradients, then step()")
        self.optimizer_class = optimizer_class
        self.reduce = _checks.choice("reduce", reduce, REDUCTIONS)
        self.reduce_order = _checks.choice("reduce_order", reduce_order, REDUCE_ORDERS)
        self._clip_grad_norm = None if clip_grad_norm is None else _checks.positive("clip_grad_norm", clip_grad_norm)
        self._clip_grad_value = None if clip_grad_value is None else _checks.positive("clip_grad_value", clip_grad_value)
        if not isinstance(skip_nonfinite, (bool, np.bool_)):
            raise TypeError(f"skip_nonfinite must be a bool, got {skip_nonfinite!r}")
        self._skip_nonfinite = bool(skip_nonfinite)
        self._kwargs = dict(kwargs)
        groups = _as_groups(params)
        signature = []
        for g, group in enumerate(groups):
            arrays = group["params"]
            arrays = [arrays] if isinstance(arrays, np.ndarray) else list(arrays)
            for k, p in enumerate(arrays):
                if not isinstance(p, np.ndarray) or p.dtype not in (np.float32, np.float64):
                    raise TypeError(f"param_groups[{g}]['params'][{k}] must be a float32 or float64 numpy.ndarray, "
                                    f"got {getattr(p, 'dtype', type(p).__name__)}")
            if not arrays:
                raise ValueError(f"param_groups[{g}] has no parameters")
            groups[g] = {**group, "params": arrays}
            signature.append(ckpt.group_signature(arrays))
        self._signature = signature
        self._buckets = buckets_of(signature, self.world_size)
        self._allocate(groups)
        overrides = [{k: v for k, v in group.items() if k != "params"} for group in groups]
        inner_groups = [{"params": [self._param_arenas[k][slice(*b.shard_range(self.rank))]], **overrides[b.group]}
                        for k, b in enumerate(self._buckets)]
        self.shard_optimizer = optimizer_class(inner_groups, **kwargs)
        first_bucket = {}
        for k, b in enumerate(self._buckets):
            first_bucket.setdefault(b.group, k)
        self.defaults = dict(getattr(self.shard_optimizer, "defaults", {}))
        self.param_groups = []
        for g, views in enumerate(self._views):
            hyper = self.shard_optimizer.param_groups[first_bucket[g]]
            self.param_groups.append({"params": ParamList(views), **_hyper(hyper)})
        self._param_lists = [group["params"] for group in self.param_groups]
        self._validated = [copy.deepcopy(_hyper(group)) for group in self.param_groups]

    def _allocate(self, groups):
        """Flat, padded, cache-line aligned arenas per bucket; the parameters copied in."""
        self._param_arenas, self._grad_arenas, self._shard_grads, self._shard_grad_views = [], [], [], []
        self._views = [[None] * len(group["params"]) for group in groups]
        self._grad_views = [[None] * len(group["params"]) for group in groups]
        for b in self._buckets:
            param_arena = aligned_empty(b.padded_size, b.dtype)
            grad_arena = aligned_empty(b.padded_size, b.dtype)
            param_arena[b.size:] = 0
            grad_arena.fill(0)
            for position, view, grad in zip(b.positions, b.views(param_arena), b.views(grad_arena)):
                np.copyto(view, groups[b.group]["params"][position])
                self._views[b.group][position] = view
                self._grad_views[b.group][position] = grad
            start, stop = b.shard_range(self.rank)
            if self.world_size == 1:  # nothing to reduce: the rule reads the gradients in place
                shard_grad = grad_arena[start:stop]
            else:
                shard_grad = aligned_empty(b.chunk, b.dtype)
                self._shard_grads.append(shard_grad)
                shard_grad = shard_grad[:stop - start]
            self._param_arenas.append(param_arena)
            self._grad_arenas.append(grad_arena)
            self._shard_grad_views.append(shard_grad)
        self._scratch = {}
        if self.world_size > 2 and self.reduce_order == "rank":
            for b in self._buckets:
                n = self.world_size * min(b.chunk, _ROUND)
                if n > len(self._scratch.get(b.dtype, ())):
                    self._scratch[b.dtype] = aligned_empty(n, b.dtype)

    def _check_same_everywhere(self):
        """Raise on every rank if the ranks built different optimizers."""
        mine = (self.optimizer_class.__name__, self.reduce, self.reduce_order, self._clip_grad_norm,
                self._clip_grad_value, self._skip_nonfinite,
                [[(s, d.str) for s, d in group] for group in self._signature],
                [repr(sorted(_hyper(group).items())) for group in self.param_groups])
        everyone = self.comm.allgather(mine)
        labels = ("optimizer class", "reduce", "reduce_order", "clip_grad_norm", "clip_grad_value",
                  "skip_nonfinite", "parameter shapes and dtypes", "hyperparameters")
        for rank, theirs in enumerate(everyone):
            for label, a, b in zip(labels, everyone[0], theirs):
                if a != b:
                    raise ValueError(f"the ranks disagree on the {label}: rank 0 has {a}, rank {rank} has {b}")

    # ------------------------------------------------------------------ access
    @property
    def params(self):
        """Every parameter (views into the replicated arena), group after group."""
        return [p for group in self.param_groups for p in group["params"]]

    @property
    def grads(self):
        """The gradient views to fill (aligned with ``params``); ``step()`` then reads them."""
        return [g for group in self._grad_views for g in group]

    @property
    def clip_grad_norm(self):
        return self._clip_grad_norm

    @property
    def clip_grad_value(self):
        return self._clip_grad_value

    @property
    def skip_nonfinite(self):
        return self._skip_nonfinite

    def zero_grad(self):
        """Set every gradient view to zero."""
        for arena in self._grad_arenas:
            arena.fill(0)

    def state_bytes(self):
        """Bytes of optimizer state on this rank (about 1/N of one process's)."""
        return sum(v.nbytes for entry in self.shard_optimizer.state.values() for v in entry.values()
                   if isinstance(v, np.ndarray))

    def shard_ranges(self):
        """Per (group, dtype) bucket: ``(group, dtype, start, stop, size)``, the
        elements of the group's flat arena of that dtype this rank owns."""
        return [(b.group, b.dtype, *b.shard_range(self.rank), b.size) for b in self._buckets]

    # -------------------------------------------------------------------- step
    def step(self, grads=None, *, grad_scale=1.0):
        """Take one step on every rank (collective); return True, or False if the
        non-finite guard skipped it (on every rank).

        Parameters
        ----------
        grads : list of ndarray, or None
            This rank's gradients, one per parameter (copied into the gradient
            arena), or None: the views ``opt.grads`` already hold them.
        grad_scale : float
            Multiplies every reduced gradient as the rule reads it (``1 / S``
            removes a loss scale ``S``); composes with ``reduce="mean"`` and clipping.
        """
        with agreed(self.comm, "step"):
            grad_scale = _checks.positive("grad_scale", grad_scale)
            if grads is not None:
                self._take_grads(grads)
            self._check_hyperparameters()
        with or_abort(self.comm, "step"):
            self._sync_hyperparameters()
            for k in range(len(self._buckets)):
                self._reduce_scatter(k)
            if self.reduce == "mean":
                grad_scale /= self.world_size
            scale = self._clip(grad_scale)
            if scale is None:
                self.skipped_steps += 1
                return False
            self.shard_optimizer.step(list(self._shard_grad_views), grad_scale=scale)
            for k in range(len(self._buckets)):
                self._all_gather(k)
        return True

    def _take_grads(self, grads):
        if not isinstance(grads, (list, tuple)):
            raise TypeError(f"grads must be a list of arrays, got {type(grads).__name__}")
        views, params = self.grads, self.params
        if len(grads) != len(params):
            raise ValueError(f"{len(grads)} gradients for {len(params)} parameters")
        for i, (g, p) in enumerate(zip(grads, params)):
            if not isinstance(g, np.ndarray):
                raise TypeError(f"grads[{i}] must be a numpy.ndarray, got {type(g).__name__}")
            if g.dtype != p.dtype:
                raise TypeError(f"grads[{i}] has dtype {g.dtype}; its parameter has {p.dtype}")
            if g.shape != p.shape:
                raise ValueError(f"grads[{i}] has shape {g.shape}; its parameter has {p.shape}")
        for g, view in zip(grads, views):
            if g is not view:
                np.copyto(view, g)

    def _check_hyperparameters(self):
        """Validate changed hyperparameters now, before any rank enters a collective
        (a throw-away one-element optimizer runs the rule's own checks)."""
        for g, group in enumerate(self.param_groups):
            if group["params"] is not self._param_lists[g]:
                raise ValueError(f"param_groups[{g}]['params'] was replaced; parameters are fixed")
            hyper = _hyper(group)
            if _same(self._validated[g], hyper):
                continue
            probe = np.zeros(1, dtype=self._signature[g][0][1])
            try:
                self.optimizer_class([{"params": [probe], **hyper}], **self._kwargs)
            except (TypeError, ValueError) as error:
                raise type(error)(f"param_groups[{g}]: {error}") from None
            self._validated[g] = copy.deepcopy(hyper)

    def _sync_hyperparameters(self):
        for b, inner in zip(self._buckets, self.shard_optimizer.param_groups):
            inner.update(_hyper(self.param_groups[b.group]))

    def _reduce_scatter(self, k):
        """This rank's shard of the sum over ranks of bucket ``k``'s gradients."""
        if self.world_size == 1:
            return
        MPI = mpi()
        b, send, out = self._buckets[k], self._grad_arenas[k], self._shard_grads[k]
        if self.reduce_order == "mpi" or self.world_size == 2:  # two operands: one addition, in either order
            self.comm.Reduce_scatter_block(send, out, op=MPI.SUM)
            return
        n_ranks, mpi_type = self.world_size, datatype(b.dtype)
        scratch = self._scratch[b.dtype]
        for start in range(0, b.chunk, _ROUND):
            n = min(_ROUND, b.chunk - start)
            counts = [n] * n_ranks
            self.comm.Alltoallv([send, (counts, [r * b.chunk + start for r in range(n_ranks)]), mpi_type],
                                [scratch, (counts, [r * n for r in range(n_ranks)]), mpi_type])
            rows, total = scratch[:n_ranks * n].reshape(n_ranks, n), out[start:start + n]
            np.add(rows[0], rows[1], out=total)
            for r in range(2, n_ranks):
                np.add(total, rows[r], out=total)

    def _all_gather(self, k):
        if self.world_size > 1:
            self.comm.Allgather(mpi().IN_PLACE, self._param_arenas[k])

    def _clip(self, grad_scale):
        """The scale the rule applies (clipping folded in), or None to skip the step;
        the same on every rank."""
        if not (self._skip_nonfinite or self._clip_grad_norm is not None or self._clip_grad_value is not None):
            self.last_grad_norm = None
            return grad_scale
        shards = self._shard_grad_views
        options = dict(n_threads=self.shard_optimizer.n_threads, backend=self.shard_optimizer.backend)
        local = None
        if self._skip_nonfinite and self._clip_grad_value is not None:
            local = global_norm(shards, **options)  # the guard looks at the gradients before clamping
        if local is None or math.isfinite(local):
            if self._clip_grad_value is not None:
                limit = self._clip_grad_value / grad_scale
                for shard in shards:  # as the norm kernel clamps: NaN stays NaN
                    np.clip(shard, -shard.dtype.type(limit), shard.dtype.type(limit), out=shard)
            local = global_norm(shards, **options)
        norms = np.empty(self.world_size)
        self.comm.Allgather(np.array([local]), norms)
        norm = grad_scale * _combined_norm(norms.tolist())
        self.last_grad_norm = norm
        if not math.isfinite(norm):
            if self._skip_nonfinite:
                return None
            if self._clip_grad_norm is None:
                return grad_scale
            # The factor is 0 (as fastdescent.optim and torch for an infinite norm);
            # step() takes only positive scales, so zero the reduced gradients instead.
            for shard in shards:
                shard *= 0
            return grad_scale
        if self._clip_grad_norm is not None:
            factor = self._clip_grad_norm / (norm + _CLIP_EPS)
            if factor < 1.0:
                return grad_scale * factor
        return grad_scale

    # ------------------------------------------------------------------- state
    def register_state(self, name, obj):
        """Save and restore ``obj`` (a schedule, a weight average: anything with
        ``state_dict()`` and ``load_state_dict()``, the same on every rank) with the
        optimizer's checkpoints. Rank 0's state is saved."""
        check_registrable(self._registered, name, obj)
        self._registered[name] = obj

    def _group_state(self):
        """Per group: None or ``(scalars, names)`` of its state (from its first bucket):
        the scalar entries (the step...) and the names of the state buffers."""
        out = [None] * len(self.param_groups)
        for k, b in enumerate(self._buckets):
            entry = self.shard_optimizer.state.get(k)
            if out[b.group] is None and entry:
                names = tuple(sorted(n for n, v in entry.items() if ckpt.is_buffer(v)))
                out[b.group] = ({n: v for n, v in entry.items() if n not in names}, names)
        return out

    def _extra(self):
        return {name: obj.state_dict() for name, obj in self._registered.items()} if self._registered else None

    def _gathered(self, root):
        """A source holding the whole state (on ``root``, or every rank if None)."""
        group_state = self._group_state()
        flats = {}
        for k, b in enumerate(self._buckets):
            state = group_state[b.group]
            for name in state[1] if state else ():
                flats[k, name] = self._gather(k, self.shard_optimizer.state[k][name], root)
        source = ckpt.StateSource()
        source.hyper = [_hyper(group) for group in self.param_groups]
        source.group_state = group_state
        source.extra = self._extra() if root is None or root == self.rank else None
        source.read = lambda k, name, start, stop: flats[k, name][start:stop]
        return source

    def _gather(self, k, local, root):
        b = self._buckets[k]
        if self.world_size == 1:
            return local.copy()
        ranges = b.ranges()
        counts, displs = [e - s for s, e in ranges], [s for s, _ in ranges]
        full = np.empty(b.size, dtype=b.dtype) if root is None or root == self.rank else None
        target = None if full is None else [full, (counts, displs), datatype(b.dtype)]
        if root is None:
            self.comm.Allgatherv(local, target)
        else:
            self.comm.Gatherv(local, target, root=root)
        return full

    def state_dict(self, *, to=0):
        """The whole optimizer's state dict, in the layout of a single-process
        ``optimizer_class`` over the same groups (loadable there), on rank ``to``
        (None on the others), or on every rank if ``to`` is None. Collective."""
        if to is not None and not (isinstance(to, int) and 0 <= to < self.world_size):
            raise ValueError(f"to must be a rank in [0, {self.world_size}) or None, got {to!r}")
        with or_abort(self.comm, "state_dict()"):
            source = self._gathered(to)
        if to is not None and to != self.rank:
            return None
        sd, _ = ckpt.full_state_dict(source, self._signature, params=False)
        return sd  # its arrays are views of freshly gathered copies

    def load_state_dict(self, state_dict, *, strict=True):
        """Load a single-process state dict (as :meth:`state_dict` returns, or a plain
        optimizer's), given on every rank: each rank keeps its shards. Everything is
        checked on every rank first; on any error nothing changes anywhere."""
        with agreed(self.comm, "load_state_dict()"):
            source = ckpt.FullStateSource(state_dict, self._signature)
            self._check_extra_names(source.extra, strict)
            part = self._local_part(source.read, source, params=False)
        self._apply(*part)

    # ------------------------------------------------------------ checkpoints
    def save(self, path, *, sharded=False, params=True):
        """Write a checkpoint (collective).

        ``sharded=False``: one file, written by rank 0, in the format of a
        single-process ``optimizer_class.save`` (so ``fastdescent.Adam(...).load(path)``
        reads it); the state is gathered on rank 0, which needs memory for it twice.
        ``sharded=True``: ``path`` is a directory; each rank writes its own shards to
        one file and rank 0 writes a small index last (see
        :mod:`fastdescent.distributed.checkpoint`). Either loads on any number of ranks.
        """
        if sharded:
            self._save_sharded(path, params)
            return
        with or_abort(self.comm, "save()"):
            source = self._gathered(0)
        with agreed(self.comm, "save()"):
            if self.rank == 0:
                sd, _ = ckpt.full_state_dict(source, self._signature, params=False)
                plain, _ = self._plain([list(group["params"]) for group in self.param_groups])
                plain.load_state_dict(sd)
                plain.save(path, params=params)

    def _plain(self, arrays_of_groups, *, empty_stand_ins=False):
        """A single-process ``optimizer_class`` over ``arrays_of_groups`` with this
        optimizer's hyperparameters, and the stand-ins registered in it for this
        optimizer's registered objects (holding their states, or nothing yet)."""
        plain = self.optimizer_class([{"params": arrays, **_hyper(group)}
                                      for arrays, group in zip(arrays_of_groups, self.param_groups)], **self._kwargs)
        stand_ins = {name: _Captured(None if empty_stand_ins else obj.state_dict())
                     for name, obj in self._registered.items()}
        for name, stand_in in stand_ins.items():
            plain.register_state(name, stand_in)
        return plain, stand_ins

    def _save_sharded(self, path, params):
        save_id = self.comm.bcast(secrets.token_hex(8) if self.rank == 0 else None, root=0)
        with agreed(self.comm, "save(sharded=True)"):
            if self.rank == 0:
                ckpt.make_directory(path)
        with agreed(self.comm, "save(sharded=True)"):
            arrays = {}
            for k, b in enumerate(self._buckets):
                start, stop = b.shard_range(self.rank)
                if params:
                    arrays[f"b{k}/param"] = self._param_arenas[k][start:stop]
                for name, value in (self.shard_optimizer.state.get(k) or {}).items():
                    if isinstance(value, np.ndarray):
                        arrays[f"b{k}/{name}"] = value
            ckpt.write_rank_file(path, save_id, self.rank, self.world_size, arrays)
        with agreed(self.comm, "save(sharded=True)"):
            if self.rank == 0:
                ckpt.write_index(path, save_id=save_id, world_size=self.world_size,
                                 optimizer_name=self.optimizer_class.__name__, signature=self._signature,
                                 hyper=[_hyper(group) for group in self.param_groups],
                                 group_state=self._group_state(), buckets=self._buckets, has_params=params,
                                 extra=self._extra())
                ckpt.remove_stale_rank_files(path, save_id)

    def load(self, path, *, params=True, strict=True):
        """Restore a checkpoint written by :meth:`save` on any number of ranks
        (sharded or not), or by a single-process ``optimizer_class.save`` (collective).

        Everything is checked first, on every rank (files, class, shapes,
        hyperparameters, registered objects); on any error every rank raises
        :class:`fastdescent.CheckpointError` (or RankError) and nothing changes. A
        sharded checkpoint must be readable by every rank (a shared file system);
        each rank reads only the rank files that overlap its shards. A single
        file is read by rank 0, which sends each rank its shards.
        """
        sharded = None
        with agreed(self.comm, "load()"):
            if self.rank == 0:
                sharded = ckpt.is_sharded(path)
        if self.comm.bcast(sharded, root=0):
            with agreed(self.comm, "load()"):
                source = ckpt.ShardedSource(path, self.optimizer_class.__name__, self._signature)
                self._check_extra_names(source.extra, strict)
                part = _as_checkpoint_error(path, lambda: self._local_part(source.read, source, params))
        else:
            source = None
            with agreed(self.comm, "load()"):
                if self.rank == 0:
                    source = self._read_single_file(path, params, strict)
            meta = self.comm.bcast(None if source is None else _Meta(source), root=0)
            with or_abort(self.comm, "load()"):
                part = self._local_part(self._scattering_reader(source), meta, params)
        self._apply(*part)

    def _read_single_file(self, path, params, strict):
        """Rank 0: a single-process checkpoint, validated by the rule's own ``load``."""
        # Starting from the current values: a file without parameters leaves them as they are.
        plain, stand_ins = self._plain([[p.copy() for p in group["params"]] for group in self.param_groups],
                                       empty_stand_ins=True)
        plain.load(path, params=params, strict=strict)
        groups, first = [], 0
        for group in plain.param_groups:
            groups.append({**_hyper(group), "params": list(range(first, first + len(group["params"])))})
            first += len(group["params"])
        sd = {"state": dict(plain.state), "param_groups": groups}
        extra = {name: s.state for name, s in stand_ins.items() if s.state is not None}
        if extra:
            sd["extra"] = extra
        return ckpt.FullStateSource(sd, self._signature, params=plain.params if params else None)

    def _scattering_reader(self, source):
        """``read(k, name, start, stop)`` for every rank, from ``source`` on rank 0 (collective)."""
        def read(k, name, start, stop):
            b = self._buckets[k]
            out = np.empty(stop - start, dtype=b.dtype)
            if self.world_size == 1:
                out[:] = source.read(k, name, start, stop)
                return out
            ranges = b.ranges()
            send = None
            if self.rank == 0:
                send = [source.read(k, name, 0, b.size), ([e - s for s, e in ranges], [s for s, _ in ranges]),
                        datatype(b.dtype)]
            self.comm.Scatterv(send, out, root=0)
            return out
        return read

    def _check_extra_names(self, extra, strict):
        extra = {} if extra is None else extra
        if strict and set(extra) != set(self._registered):
            raise CheckpointError(
                f"the checkpoint holds state for {sorted(extra)} but {sorted(self._registered)} are registered; "
                "register_state() the same objects first (or load with strict=False)"
            )

    def _local_part(self, read, meta, params):
        """What this rank loads: its shard optimizer's state dict, its parameter
        shards (or None), the groups' hyperparameters and the registered states."""
        inner = {"state": {}, "param_groups": []}
        values = [] if params and meta.has_params else None
        for k, b in enumerate(self._buckets):
            start, stop = b.shard_range(self.rank)
            inner["param_groups"].append({**meta.hyper[b.group], "params": [k]})
            state = meta.group_state[b.group]
            if state is not None:
                scalars, names = state
                entry = dict(scalars)
                for name in names:
                    entry[name] = read(k, name, start, stop)
                inner["state"][k] = entry
            if values is not None:
                values.append(read(k, "param", start, stop))
        return inner, values, meta.hyper, meta.extra

    def _apply(self, inner, values, hyper, extra):
        """Load everywhere or nowhere: each rank loads its part (the rule validates it),
        the ranks agree, and all roll back if any failed; then the parameters."""
        backup = self.shard_optimizer.state_dict()
        names = [name for name in self._registered if extra and name in extra]
        backups = {name: copy.deepcopy(self._registered[name].state_dict()) for name in names}
        loaded = []
        try:
            with agreed(self.comm, "load"):
                self.shard_optimizer.load_state_dict(inner)
                for name in names:
                    self._registered[name].load_state_dict(extra[name])
                    loaded.append(name)
        except Exception:
            self.shard_optimizer.load_state_dict(backup)
            for name in loaded:
                self._registered[name].load_state_dict(backups[name])
            raise
        with or_abort(self.comm, "load"):
            for group, saved in zip(self.param_groups, hyper):
                group.update(saved)
            self._validated = [copy.deepcopy(_hyper(group)) for group in self.param_groups]
            if values is not None:
                for k, (b, value) in enumerate(zip(self._buckets, values)):
                    start, stop = b.shard_range(self.rank)
                    self._param_arenas[k][start:stop] = value
                    self._all_gather(k)

    def __repr__(self):
        return (f"ShardedOptimizer({self.optimizer_class.__name__}, rank {self.rank} of {self.world_size}, "
                f"{len(self.param_groups)} groups, reduce={self.reduce!r}, reduce_order={self.reduce_order!r})")


class _Captured:
    """Stands in for a registered object in a single-process optimizer, so that its
    checkpoint carries (or hands back) the object's state."""

    def __init__(self, state):
        self.state = state

    def state_dict(self):
        return {} if self.state is None else self.state

    def load_state_dict(self, state):
        self.state = state


class _Meta:
    """What every rank must know of a source read by rank 0 (no arrays but the extras)."""

    def __init__(self, source):
        self.hyper, self.group_state, self.extra = source.hyper, source.group_state, source.extra
        self.has_params = source.has_params


def _as_checkpoint_error(path, fn):
    try:
        return fn()
    except CheckpointError:
        raise
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path} does not fit this optimizer: {error}") from error


def _hyper(group):
    return {k: v for k, v in group.items() if k != "params"}


def _same(a, b):
    try:
        return a == b
    except ValueError:  # an array-valued hyperparameter: check it again
        return False


def _as_groups(params):
    if isinstance(params, (np.ndarray, dict)) or not hasattr(params, "__iter__"):
        raise TypeError(f"params must be a list of arrays or of parameter-group dicts, got {type(params).__name__}")
    params = list(params)
    if not params:
        raise ValueError("the optimizer got an empty parameter list")
    if all(isinstance(p, dict) for p in params):
        for g, group in enumerate(params):
            if "params" not in group:
                raise ValueError(f"param_groups[{g}] needs a 'params' entry")
        return [dict(group) for group in params]
    if any(isinstance(p, dict) for p in params):
        raise TypeError("params must be all arrays or all parameter-group dicts")
    return [{"params": params}]


def _combined_norm(norms):
    """:math:`\\sqrt{\\sum_r n_r^2}` of per-rank norms, added in rank order, scaled by a
    power of two so that no square overflows or underflows; NaN or inf if any is."""
    if any(math.isnan(n) for n in norms):
        return math.nan
    biggest = max(norms)
    if biggest == math.inf or biggest == 0.0:
        return biggest
    shift = math.frexp(biggest)[1]
    total = 0.0
    for n in norms:
        total += math.ldexp(n, -shift) ** 2
    return math.ldexp(math.sqrt(total), shift)
