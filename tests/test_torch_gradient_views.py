"""How fastdescent.torch reaches the gradients (``_tensorviews.BucketViews``): each
gradient's layout, dtype, device and memory checked at every step, read through
DLPack's C exchange table where torch has one and through torch's Python methods
otherwise (another torch, tensor subclasses); a gradient it cannot view in place is
copied, or refused before anything is written."""

import pytest

torch = pytest.importorskip("torch")

import fastdescent.torch as fdt  # noqa: E402
from fastdescent.torch import _adapter  # noqa: E402
from test_torch_step_plan import CONFIGS, assert_identical, train  # noqa: E402
from torch_support import assert_unchanged, one_torch_thread, snapshot  # noqa: E402, F401

EXCHANGE = getattr(torch.Tensor, "__dlpack_c_exchange_api__", None)


@pytest.fixture(params=["exchange-table", "python-methods"])
def reader(request, monkeypatch):
    """Each test runs twice: gradients read through DLPack's exchange table (where
    this torch has one), and through torch's Python methods only."""
    if request.param == "exchange-table":
        if EXCHANGE is None:
            pytest.skip("this torch has no __dlpack_c_exchange_api__")
    else:
        methods = list(_adapter._TENSOR_METHODS)
        methods[6] = None
        monkeypatch.setattr(_adapter, "_TENSOR_METHODS", tuple(methods))
    return request.param


class Marked(torch.Tensor):
    """A tensor subclass: its objects are read through their Python methods."""


def adam_pair(shape=(8,), dtype=torch.float32, seed=0):
    """Two equal parameters, each with its own fastdescent.torch.Adam."""
    torch.manual_seed(seed)
    first = torch.nn.Parameter(torch.randn(shape, dtype=dtype))
    second = torch.nn.Parameter(first.detach().clone())
    return (first, fdt.Adam([first], lr=0.1)), (second, fdt.Adam([second], lr=0.1))


@pytest.mark.parametrize("reuse_gradients", [False, True], ids=["new-grads", "same-grads"])
@pytest.mark.parametrize("rule", ["Adam", "SGD", "Adagrad"])
def test_both_readers_step_as_the_general_way(reader, rule, reuse_gradients):
    """Every layout (gapped, transposed, channels_last, a scalar, a late parameter),
    two dtypes: the plan and the general way agree bit for bit with either reader."""
    assert rule in CONFIGS
    assert_identical(train(rule, reuse_gradients=reuse_gradients),
                     train(rule, reuse_gradients=reuse_gradients, general=True))


def test_the_exchange_table_is_used_where_torch_has_one():
    if EXCHANGE is None:
        pytest.skip("this torch has no __dlpack_c_exchange_api__")
    assert _adapter._TENSOR_METHODS[6] is EXCHANGE


def test_negative_views_are_read_as_their_values(reader):
    """``z.conj().imag`` is a negative view (its memory holds the values' negation);
    so is its ``.data``, which is not a view. New objects every step: the same
    results as with the values resolved."""
    (neg, neg_opt), (plain, plain_opt) = adam_pair()
    generator = torch.Generator().manual_seed(3)
    for step in range(6):
        z = torch.complex(torch.randn(8, generator=generator), torch.randn(8, generator=generator))
        view = z.conj().imag
        neg.grad = view.data if step % 2 else view
        assert neg.grad.is_neg()
        plain.grad = view.resolve_neg()
        neg_opt.step()
        plain_opt.step()
        assert torch.equal(neg, plain), step
    assert neg_opt._fd_step_plan is not None


def test_conjugate_gradients_of_complex_parameters_are_read_as_their_values(reader):
    (conj, conj_opt), (plain, plain_opt) = adam_pair(shape=(5,), dtype=torch.complex64)
    generator = torch.Generator().manual_seed(4)
    for step in range(5):
        w = torch.randn(5, dtype=torch.complex64, generator=generator)
        conj.grad = w.conj()
        assert conj.grad.is_conj()
        plain.grad = w.conj().resolve_conj()
        conj_opt.step()
        plain_opt.step()
        assert torch.equal(conj, plain), step


def test_gradient_whose_data_became_another_dtype_of_the_same_size_is_refused(reader):
    """The gradient object of the previous steps, its data replaced by float64 of the
    same byte size: refused, naming the dtype, nothing written."""
    (p, opt), _ = adam_pair()
    p.grad = torch.randn(8)
    opt.step()
    opt.step()
    p.grad.data = torch.zeros(4, dtype=torch.float64)
    before = snapshot(opt)
    with pytest.raises(TypeError, match="its gradient has dtype torch.float64"):
        opt.step()
    assert_unchanged(opt, before)


def test_gradient_resized_in_place_is_refused(reader):
    (p, opt), _ = adam_pair(shape=(4, 4))
    p.grad = torch.randn(4, 4)
    opt.step()
    opt.step()
    p.grad.resize_(2, 2)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"its gradient has shape \(2, 2\)"):
        opt.step()
    assert_unchanged(opt, before)


def test_gradients_of_a_tensor_subclass(reader):
    """Gradients of a subclass (read through their Python methods), new and reused."""
    (marked, marked_opt), (plain, plain_opt) = adam_pair(shape=(3, 4))
    generator = torch.Generator().manual_seed(5)
    kept = torch.zeros(3, 4).as_subclass(Marked)
    for step in range(6):
        values = torch.randn(3, 4, generator=generator)
        if step < 3:
            marked.grad = values.clone().as_subclass(Marked)
        else:
            kept.copy_(values)
            marked.grad = kept
        assert type(marked.grad) is Marked
        plain.grad = values
        marked_opt.step()
        plain_opt.step()
        assert torch.equal(marked, plain), step
    assert marked_opt._fd_step_plan is not None


def test_contiguous_gradient_with_any_stride_on_a_dimension_of_size_one_is_viewed_in_place(reader):
    """torch calls a tensor contiguous whatever the stride of a dimension of size 1:
    so does the reader, and such a gradient is viewed where it is, not copied."""
    (p, opt), (q, ref) = adam_pair(shape=(4, 1, 3))
    for step in range(3):
        values = torch.randn(12)
        p.grad = values.clone().as_strided((4, 1, 3), (3, 7, 1))
        assert p.grad.is_contiguous() and p.grad.stride() == (3, 7, 1)
        q.grad = values.reshape(4, 1, 3)
        opt.step()
        ref.step()
        assert torch.equal(p, q)
    views = opt._fd_plans[0].buckets[0].views
    p.grad = torch.randn(12).as_strided((4, 1, 3), (3, 7, 1))
    assert views.collect() == 1 and not views.odd  # COMPLETE, in place
    views.release()


def test_gradient_sharing_memory_with_the_state_is_refused(reader):
    """A gradient that is the parameter's own exp_avg: the kernel would read what it
    writes; refused before anything is written (as by the general way)."""
    (p, opt), _ = adam_pair()
    p.grad = torch.randn(8)
    opt.step()
    opt.step()
    p.grad = opt.state[p]["exp_avg"]
    before = snapshot(opt)
    with pytest.raises(ValueError):
        opt.step()
    assert_unchanged(opt, before)
